// The dashboard's only script: live counts without a reload, and a question before invalidating.
// Counts are written with textContent (never as HTML): step names are data from scripts.
(function () {
  "use strict";

  for (const b of document.querySelectorAll("button[data-confirm]")) {
    b.addEventListener("click", function (ev) {
      if (!window.confirm(b.dataset.confirm)) ev.preventDefault();
    });
  }

  const live = document.getElementById("live");
  if (!live) return;
  const url = live.dataset.status;
  const every = parseInt(live.dataset.poll, 10) || 2000;
  const stale = live.querySelector("[data-stale]");

  // as the page's template shows them: a task a runner has claimed but not started yet counts as running
  function shown(counts, k) {
    return k === "running" ? counts.running + counts.leased : counts[k];
  }

  function update(doc) {
    const byStep = new Map(doc.steps.map(function (c) { return [c.step, c]; }));
    for (const el of document.querySelectorAll("[data-step][data-count]")) {
      const row = byStep.get(el.dataset.step);
      el.textContent = String(row ? shown(row, el.dataset.count) : 0);
    }
    for (const g of document.querySelectorAll("g.node[data-step]")) {
      const row = byStep.get(g.dataset.step);
      g.classList.toggle("has-failed", Boolean(row && row.failed));
    }
    for (const el of document.querySelectorAll("[data-total]")) {
      el.textContent = String(shown(doc.totals, el.dataset.total));
    }
    const gathers = new Map((doc.gathers || []).map(function (g) { return [g.step, g.summary]; }));
    for (const el of document.querySelectorAll("[data-gather]")) {
      if (gathers.has(el.dataset.gather)) el.textContent = gathers.get(el.dataset.gather);
    }
    const age = live.querySelector("[data-age]");
    if (age) {
      age.textContent = doc.oldest_pending_age === null ? "" : "oldest pending " + Math.round(doc.oldest_pending_age) + "s";
    }
  }

  async function tick() {
    try {
      const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
      if (!r.ok) throw new Error(String(r.status));
      update(await r.json());
      if (stale) stale.hidden = true;
    } catch (e) {
      if (stale) stale.hidden = false;
    } finally {
      window.setTimeout(tick, document.hidden ? every * 5 : every);
    }
  }
  window.setTimeout(tick, every);
})();
