"use strict";
// The page posts the drawing or the file to /v1/predict, the same API curl uses.
(function () {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const bars = document.getElementById("bars");
  const barFill = [];
  for (let d = 0; d < 10; d++) {
    const row = document.createElement("div");
    row.className = "bar";
    const label = document.createElement("span");
    label.textContent = String(d);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.id = "p" + d;
    track.appendChild(fill);
    row.append(label, track);
    bars.appendChild(row);
    barFill.push(fill);
  }

  function clearPad() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
  }
  clearPad();

  function show(rec) {
    const digit = document.getElementById("digit");
    const err = document.getElementById("error");
    digit.textContent = rec.digit === null ? "–" : String(rec.digit);
    document.getElementById("confidence").textContent =
      rec.confidence === null ? "–" : (100 * rec.confidence).toFixed(1) + " %";
    document.getElementById("flag").textContent =
      rec.status === "ok" && rec.uncertain ? "(uncertain)" : "";
    const msg = rec.status === "ok" ? "" : rec.status + (rec.error ? ": " + rec.error : "");
    err.textContent = msg;
    err.hidden = !msg;
    const probs = rec.probabilities || [];
    barFill.forEach(function (fill, d) {
      const p = probs.length ? probs[d] : 0;
      fill.style.width = (100 * p).toFixed(1) + "%";
      fill.title = d + ": " + (100 * p).toFixed(2) + " %";
      fill.parentElement.parentElement.classList.toggle("top", d === rec.digit);
    });
    const seen = document.getElementById("seen");
    if (rec.seen_png) {
      seen.src = rec.seen_png;
      seen.hidden = false;
    } else {
      seen.hidden = true;
    }
    document.getElementById("input").textContent = rec.input + " · " + rec.model;
    document.body.dataset.state = "answered";
  }

  function fail(text) {
    const err = document.getElementById("error");
    err.textContent = text;
    err.hidden = false;
    document.body.dataset.state = "failed";
  }

  let seq = 0;
  async function send(blob, name) {
    const mine = ++seq;
    document.body.dataset.state = "asking";
    try {
      const r = await fetch("/v1/predict?seen=1&name=" + encodeURIComponent(name), {
        method: "POST",
        body: blob,
      });
      const body = await r.json();
      if (mine !== seq) return; // a newer drawing has been sent meanwhile
      if (!r.ok) return fail(r.status + ": " + body.error);
      show(Array.isArray(body) ? body[0] : body);
    } catch (e) {
      fail(String(e));
    }
  }

  // Pointer events: one code path for a mouse, a pen and a finger.
  let drawing = false;
  function at(ev) {
    const box = pad.getBoundingClientRect();
    return [(ev.clientX - box.left) * pad.width / box.width,
            (ev.clientY - box.top) * pad.height / box.height];
  }
  pad.addEventListener("pointerdown", function (ev) {
    drawing = true;
    pad.setPointerCapture(ev.pointerId);
    const [x, y] = at(ev);
    ctx.lineWidth = 18;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = "#000";
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x + 0.01, y);
    ctx.stroke();
    ev.preventDefault();
  });
  pad.addEventListener("pointermove", function (ev) {
    if (!drawing) return;
    const [x, y] = at(ev);
    ctx.lineTo(x, y);
    ctx.stroke();
    ev.preventDefault();
  });
  function end() {
    if (!drawing) return;
    drawing = false;
    pad.toBlob(function (blob) { send(blob, "drawing.png"); }, "image/png");
  }
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
  document.getElementById("clear").addEventListener("click", clearPad);

  const file = document.getElementById("file");
  file.addEventListener("change", function () {
    if (file.files.length) send(file.files[0], file.files[0].name);
  });
  const drop = document.getElementById("drop");
  ["dragenter", "dragover"].forEach(function (t) {
    drop.addEventListener(t, function (ev) { ev.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    drop.addEventListener(t, function () { drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (ev) {
    ev.preventDefault();
    const f = ev.dataTransfer.files[0];
    if (f) send(f, f.name);
  });
})();
