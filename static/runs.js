// Runs list: select runs to compare, and keep the rows of running jobs current.
"use strict";

(() => {
  const form = document.getElementById("compare-form");
  if (!form) return; // the empty state has no table
  const boxes = () => [...form.querySelectorAll("input[name=ids]")];

  document.getElementById("select-all").addEventListener("change", (event) => {
    for (const box of boxes()) box.checked = event.target.checked;
  });

  // One readable address, /compare?ids=1,2,3 (without this script the form sends ids=1&ids=2&ids=3).
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const ids = boxes().filter((b) => b.checked).map((b) => b.value);
    if (!ids.length) {
      form.querySelector(".hint").textContent = "Tick at least one run first.";
      return;
    }
    window.location.href = `/compare?ids=${ids.join(",")}`;
  });

  const ACTIVE = new Set(["queued", "running"]);
  const FINISHED = new Set(["completed", "failed", "cancelled", "diverged", "interrupted"]);
  const fmt = (v) => (v === null || v === undefined ? "—" : Number(v.toPrecision(4)).toString());

  function setText(row, selector, text) {
    const cell = row.querySelector(selector);
    if (cell) cell.textContent = text;
  }

  async function refresh() {
    const rows = [...document.querySelectorAll("#runs-table tr[data-run-id]")].filter((r) => ACTIVE.has(r.dataset.status));
    if (!rows.length) return false;
    for (const row of rows) {
      const response = await fetch(`/api/runs/${row.dataset.runId}`, { headers: { Accept: "application/json" } });
      if (!response.ok) continue;
      const run = await response.json();
      row.dataset.status = run.status;
      const badge = document.createElement("span");
      badge.className = `status status-${run.status}`;
      badge.textContent = run.status;
      row.querySelector(".cell-status").replaceChildren(badge);
      setText(row, ".cell-steps", `${run.steps_done} / ${run.total_steps || "?"}`);
      setText(row, ".cell-last-loss", fmt(run.last_loss));
      setText(row, ".cell-best-loss", fmt(run.best_loss));
      if (FINISHED.has(run.status)) row.classList.add("just-finished");
    }
    return true;
  }

  async function loop() {
    let again = true;
    try {
      again = await refresh();
    } catch (err) {
      console.warn(err);
    }
    if (again) setTimeout(loop, 2000);
  }
  setTimeout(loop, 2000);
})();
