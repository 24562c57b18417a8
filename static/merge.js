// The run page's "Take the model away" section: the Merge button starts the background merge (a CSRF-checked
// page route), then the section follows GET /api/runs/{id}/merge until the download link can be offered.
"use strict";

(() => {
  const S = Stepscope;
  const POLL_MS = 1000;
  const STAGES = { loading: "loading the base model", merging: "merging the adapter", saving: "writing safetensors" };

  function fmtBytes(n) {
    if (!Number.isFinite(n)) return "";
    const units = ["bytes", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) {
      n /= 1000;
      i += 1;
    }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  function follow(section) {
    const button = document.getElementById("merge-button");
    const bar = document.getElementById("merge-progress");
    const status = document.getElementById("merge-status");
    const link = document.getElementById("merge-download");
    S.every(POLL_MS, async () => {
      const merge = await S.getJSON(`/api/runs/${section.dataset.run}/merge`);
      section.dataset.status = merge.status;
      if (merge.status === "completed") {
        bar.hidden = true;
        button.hidden = true;
        status.textContent = `Merged into ${merge.model} (${merge.dtype}, ${fmtBytes(merge.size)}).`;
        link.href = merge.download;
        link.hidden = false;
        return false;
      }
      if (merge.status === "failed" || merge.status === "none") {
        bar.hidden = true;
        status.textContent = merge.error || "";
        button.hidden = false;
        button.disabled = false;
        return false;
      }
      bar.hidden = false;
      bar.value = merge.progress;
      status.textContent = merge.stage ? `Merging: ${STAGES[merge.stage] || merge.stage}…` : "Starting the merge…";
      return true;
    });
  }

  function setUp(section) {
    const form = document.getElementById("merge-form");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = document.getElementById("merge-button");
      const status = document.getElementById("merge-status");
      button.disabled = true;
      status.textContent = "Starting the merge…";
      const response = await fetch(form.action, { method: "POST", body: new FormData(form), headers: { Accept: "application/json" } });
      const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
      if (!response.ok) {
        status.textContent = `No merge: ${answer.error || response.status}`;
        button.disabled = false;
        return;
      }
      follow(section);
    });
    if (section.dataset.status !== "none") follow(section); // a failed one shows its error
  }

  const section = document.getElementById("merge-section");
  if (section) setUp(section);
})();
