// New-run form: the live step plan, the sweep's list of rates, the LR range test's fields, and dataset upload
// without leaving the form.
"use strict";

(() => {
  const S = Stepscope;
  const form = document.getElementById("run-form");
  const field = (name) => form.elements.namedItem(name);
  const dataset = document.getElementById("dataset");
  // From trainer/config.py, via the template (not form.dataset: a form's field named "dataset" shadows it).
  const RANGE_TEST_STEPS = Number(form.getAttribute("data-range-test-steps"));

  function rangeTest() {
    return field("kind").value === "lr_range_test";
  }

  // --- "1000 samples at batch size 100 → 10 updates per epoch" (trainer/data.py plan_steps) ----------

  function plan() {
    const option = dataset.selectedOptions[0];
    const nTrain = option && option.dataset.nTrain ? Number(option.dataset.nTrain) : NaN;
    const batch = Number(field("batch_size").value);
    const accum = Number(field("grad_accum_steps").value);
    const epochs = Number(field("epochs").value);
    const maxText = field("max_steps").value.trim();
    // An lr range test without max steps takes RANGE_TEST_STEPS (TrainConfig.step_limit).
    const maxSteps = maxText === "" ? (rangeTest() ? RANGE_TEST_STEPS : null) : Number(maxText);
    if (!Number.isInteger(batch) || !Number.isInteger(accum) || batch < 1 || accum < 1) {
      return "Batch size and gradient accumulation steps must be whole numbers ≥ 1.";
    }
    if (!Number.isFinite(nTrain)) return "Steps per epoch: known once the data set is loaded.";
    const perEpoch = Math.ceil(nTrain / (batch * accum));
    let total;
    if (maxSteps !== null) {
      if (!Number.isInteger(maxSteps) || maxSteps < 1) return "Max steps must be empty or a whole number ≥ 1.";
      total = maxSteps;
    } else {
      if (!(epochs > 0)) return "Epochs must be a number > 0.";
      total = Math.max(1, Math.ceil(epochs * perEpoch));
    }
    const at = `batch size ${batch}${accum > 1 ? ` × ${accum} accumulation steps` : ""}`;
    return `${nTrain} samples at ${at} → ${perEpoch} updates per epoch, ${total} total steps`;
  }

  function showPlan() {
    document.getElementById("plan").textContent = plan();
  }

  // --- sweep -------------------------------------------------------------------------------------

  function sweepRates() {
    const mode = form.querySelector("input[name=sweep_mode]:checked").value;
    if (mode === "range") {
      const lo = Number(field("sweep_min").value);
      const hi = Number(field("sweep_max").value);
      const n = Number(field("sweep_count").value);
      if (!(lo > 0 && hi > lo && Number.isInteger(n) && n >= 2)) return [];
      return Array.from({ length: n }, (_, i) => Number((lo * Math.exp((Math.log(hi / lo) * i) / (n - 1))).toPrecision(3)));
    }
    const parts = field("sweep_lrs").value.split(/[\s,]+/).filter(Boolean).map(Number);
    return parts.every((v) => v > 0) ? [...new Set(parts)].sort((a, b) => a - b) : [];
  }

  // --- kind: a range test uses its own rates (and cannot be swept) --------------------------------

  function showKind() {
    const range = rangeTest();
    document.getElementById("range-fieldset").hidden = !range;
    field("sweep").disabled = range;
    if (range) field("sweep").checked = false;
  }

  function showSweep() {
    const on = field("sweep").checked;
    document.getElementById("sweep-options").hidden = !on;
    field("learning_rate").disabled = on || rangeTest();
    const rates = on ? sweepRates() : [];
    document.getElementById("sweep-preview").textContent = rates.length
      ? `${rates.length} runs, at learning rates ${rates.map(S.fmtLr).join(", ")}`
      : on
        ? "Give two or more learning rates."
        : "";
    document.getElementById("start-button").textContent = rates.length ? `Start ${rates.length} runs` : "Start";
  }

  // --- upload ------------------------------------------------------------------------------------

  async function upload(event) {
    event.preventDefault();
    const status = document.getElementById("upload-status");
    const file = document.getElementById("upload-file").files[0];
    if (!file) {
      status.textContent = "Choose a file first.";
      return;
    }
    const body = new FormData(event.target); // the CSRF token, and the file input (form="upload-form")
    status.textContent = "Uploading…";
    const response = await fetch(event.target.action, { method: "POST", body, headers: { Accept: "application/json" } });
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) {
      status.textContent = `Not added: ${answer.error || answer.detail || response.status}`;
      return;
    }
    const option = new Option(answer.label, answer.value, true, true);
    option.dataset.nTrain = answer.n_train;
    document.getElementById("uploaded-datasets").append(option);
    status.textContent = `Added ${answer.label}.`;
    showPlan();
  }

  form.addEventListener("input", () => {
    showKind();
    showPlan();
    showSweep();
  });
  form.addEventListener("change", () => {
    showKind();
    showPlan();
    showSweep();
  });
  form.addEventListener("submit", () => {
    field("learning_rate").disabled = false; // disabled fields are not posted; the server ignores it for sweeps and range tests
  });
  document.getElementById("upload-form").addEventListener("submit", (event) => {
    upload(event).catch((err) => {
      document.getElementById("upload-status").textContent = `Upload failed: ${err.message}`;
    });
  });
  showKind();
  showPlan();
  showSweep();
})();
