"use strict";
// Decisions go to POST /v1/review/<id> with the token in a header (never a cookie), so
// another site cannot make this browser decide anything.
(function () {
  const tokenBox = document.getElementById("token");
  tokenBox.value = sessionStorage.getItem("digitwatch-token") || "";
  tokenBox.addEventListener("input", function () {
    sessionStorage.setItem("digitwatch-token", tokenBox.value);
  });
  const message = document.getElementById("message");

  function say(text) {
    message.textContent = text;
    message.hidden = !text;
  }

  function cell(row, child) {
    const td = document.createElement("td");
    if (child) td.append(child);
    row.appendChild(td);
    return td;
  }

  function button(text, onClick, cls) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    if (cls) b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }

  async function decide(item, row, action, digit) {
    const r = await fetch("/v1/review/" + encodeURIComponent(item.id), {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Digitwatch-Token": tokenBox.value },
      body: JSON.stringify({ action: action, digit: digit }),
    });
    const body = await r.json();
    if (!r.ok) return say(r.status + ": " + body.error);
    say("");
    row.remove();
    document.getElementById("empty").hidden = !!document.querySelector("#items tr");
  }

  function render(list) {
    const tbody = document.getElementById("items");
    tbody.textContent = "";
    list.items.forEach(function (item) {
      const rec = item.record;
      const row = document.createElement("tr");
      row.dataset.id = item.id;
      const img = document.createElement("img");
      img.className = "input";
      img.src = item.input_url;
      img.alt = rec.input;
      const name = document.createElement("div");
      name.className = "small";
      name.textContent = rec.input;
      cell(row, img).append(name);
      if (item.seen_url) {
        const seen = document.createElement("img");
        seen.src = item.seen_url;
        seen.width = seen.height = 56;
        seen.alt = "what the model saw";
        cell(row, seen);
      } else {
        cell(row, document.createTextNode("nothing found"));
      }
      const guess = rec.digit === null ? "no digit" :
        rec.digit + " (" + (100 * rec.confidence).toFixed(1) + " %)";
      cell(row, document.createTextNode(guess)).className = "guess";
      const td = cell(row);
      if (rec.digit !== null) {
        td.append(button("accept " + rec.digit, function () { decide(item, row, "accept"); },
                         "accept"));
      }
      td.append(button("not a digit", function () { decide(item, row, "reject"); }, "reject"));
      const digits = document.createElement("div");
      digits.className = "digits";
      digits.append(document.createTextNode("it is: "));
      for (let d = 0; d < 10; d++) {
        digits.append(button(String(d), function () { decide(item, row, "correct", d); },
                             "correct-" + d));
      }
      td.append(digits);
      tbody.appendChild(row);
    });
    document.getElementById("empty").hidden = list.items.length > 0;
    if (!list.decisions) say("decisions are off: the server was started without --token");
    document.body.dataset.state = "loaded";
  }

  fetch("/v1/review").then(function (r) { return r.json(); }).then(render)
    .catch(function (e) { say(String(e)); });
})();
