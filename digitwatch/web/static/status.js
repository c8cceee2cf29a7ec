"use strict";
(function () {
  const dl = document.getElementById("status");
  function row(name, value) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dl.append(dt, dd);
  }
  function counts(c) {
    return c.ok + " ok, " + c.no_digit + " no digit, " + c.error + " errors";
  }
  async function load() {
    const r = await fetch("/v1/status");
    const s = await r.json();
    const msg = document.getElementById("message");
    msg.hidden = r.ok;
    msg.textContent = r.ok ? "" : r.status + ": " + s.error;
    dl.textContent = "";
    if (!r.ok) return;
    row("inbox", s.inbox);
    row("outbox", s.outbox);
    row("waiting", s.waiting + (s.oldest_waiting_s === null ? "" :
        " (oldest " + Math.round(s.oldest_waiting_s) + " s)"));
    row("in flight", String(s.in_flight));
    s.daemons.forEach(function (d) {
      row("daemon " + d.daemon, d.in_flight + " claimed, " + (d.alive ? "alive" : "dead"));
    });
    row("answered", counts(s.answered) + " (" + s.uncertain + " uncertain)");
    row("last hour", counts(s.answered_last_hour));
    row("last answer", s.last_answer_at || "–");
    row("failed", s.failed_files + " files kept");
    row("review queue", s.review_queue + " items");
    Object.keys(s.errors).forEach(function (why) { row("  " + s.errors[why] + "×", why); });
  }
  load();
  setInterval(load, 5000);
})();
