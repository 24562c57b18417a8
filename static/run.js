// Run page: charts of one run's metrics, extended live (Server-Sent Events) while the run is going.
"use strict";

(() => {
  const S = Stepscope;
  const page = S.pageData();
  const KEYS = ["loss", "eval_loss", "lr", "grad_norm", "update_norm", "update_ratio", "step_scale", "wall_time"];
  const data = { steps: [], series: Object.fromEntries(KEYS.map((k) => [k, []])), evalSteps: [], evalLoss: [] };
  const smoothing = document.getElementById("smoothing");
  const smoothingValue = document.getElementById("smoothing-value");

  // One chart per metric; log scale where values span decades.
  const PANELS = [
    { key: "lr", title: "Learning rate", log: false, zero: true },
    { key: "grad_norm", title: "Gradient norm ‖g‖ (before clipping)", log: true },
    { key: "update_norm", title: "Update norm ‖Δw‖", log: true },
    { key: "update_ratio", title: "Update ratio ‖Δw‖ / ‖w‖", log: true },
    { key: "step_scale", title: "Step scale ‖Δw‖ / (lr · ‖g‖)   (SGD: 1)", log: true, one: true },
  ];

  function lossTraces() {
    const loss = data.series.loss;
    return [
      { x: data.steps, y: loss, name: "loss", mode: "lines", line: { color: "#1f77b4", width: 1 }, opacity: 0.3 },
      { x: data.steps, y: S.smooth(loss, Number(smoothing.value)), name: "smoothed", mode: "lines", line: { color: "#1f77b4", width: 2 } },
      { x: data.evalSteps, y: data.evalLoss, name: "eval loss", mode: "lines+markers", line: { color: "#d62728", width: 2 }, marker: { size: 5 } },
    ];
  }

  function panelLayout(title, log, { zero = false, ...extra } = {}) {
    return S.baseLayout({
      title: { text: title, font: { size: 14 } },
      xaxis: { title: { text: "step" } },
      yaxis: { type: log ? "log" : "linear", exponentformat: "power", rangemode: zero ? "tozero" : "normal" },
      legend: { x: 1, xanchor: "right", y: 1, bgcolor: "rgba(255,255,255,0.7)" },
      showlegend: false,
      height: 300,
      ...extra,
    });
  }

  function draw() {
    Plotly.react("chart-loss", lossTraces(), panelLayout("Loss (raw, smoothed) and eval loss", false, { showlegend: true }), S.plotConfig);
    for (const p of PANELS) {
      const trace = { x: data.steps, y: data.series[p.key], mode: "lines", name: p.key, line: { color: "#444", width: 1.5 } };
      const shapes = p.one ? [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: 1, y1: 1, line: { dash: "dot", color: "#999" } }] : [];
      Plotly.react(`chart-${p.key}`, [trace], panelLayout(p.title, p.log, { shapes, zero: p.zero }), S.plotConfig);
    }
  }

  function append(batch) {
    data.steps.push(...batch.steps);
    for (const k of KEYS) data.series[k].push(...(batch.series[k] || batch.steps.map(() => null)));
    // eval_loss comes aligned with the steps, null where no eval ran: keep the evaluated points only.
    (batch.series.eval_loss || []).forEach((v, i) => {
      if (v !== null) {
        data.evalSteps.push(batch.steps[i]);
        data.evalLoss.push(v);
      }
    });
  }

  function lastStep() {
    return data.steps.length ? data.steps[data.steps.length - 1] : null;
  }

  function metricsUrl(maxPoints) {
    const q = new URLSearchParams({ keys: KEYS.join(","), max_points: maxPoints });
    return `/api/runs/${page.id}/metrics?${q}`;
  }

  /** Seconds left, from the pace of the last ~50 recorded steps. */
  function eta(total, done) {
    const n = data.steps.length;
    if (!total || n < 2 || done >= total) return "";
    const first = Math.max(0, n - 50);
    const dt = data.series.wall_time[n - 1] - data.series.wall_time[first];
    const ds = data.steps[n - 1] - data.steps[first];
    return ds > 0 && dt > 0 ? `about ${S.fmtDuration(((total - done) * dt) / ds)} left` : "";
  }

  const progress = { total: page.total_steps, done: page.steps_done, finished: S.FINISHED.has(page.status) };

  function showProgress() {
    const bar = document.getElementById("progress");
    if (progress.total) {
      bar.max = progress.total;
      bar.value = progress.done;
    }
    document.getElementById("progress-text").textContent = `${progress.done} / ${progress.total || "?"} steps`;
    document.getElementById("eta").textContent = progress.finished ? "" : eta(progress.total, progress.done);
  }

  function showRun(run) {
    S.setBadge(document.getElementById("run-status"), run.status);
    document.getElementById("fact-status").textContent = run.status;
    document.getElementById("fact-last-loss").textContent = S.fmtNum(run.last_loss);
    document.getElementById("fact-best-loss").textContent = S.fmtNum(run.best_loss);
    Object.assign(progress, {
      total: run.total_steps,
      done: Math.max(progress.done, run.steps_done),
      finished: S.FINISHED.has(run.status),
    });
    showProgress();
    if (run.error) {
      document.getElementById("run-error").hidden = false;
      const where = run.error_step !== null && run.error_step !== undefined ? ` at step ${run.error_step}` : "";
      document.getElementById("run-error-title").textContent = `${run.status === "diverged" ? "Diverged" : "Failed"}${where}:`;
      document.getElementById("run-error-text").textContent = run.error;
    }
  }

  /** A finished run: delete instead of cancel, and its verdict and analysis when they are there. */
  function showFinished(run) {
    const cancel = document.getElementById("cancel-form");
    if (cancel) cancel.hidden = true;
    document.getElementById("delete-form").hidden = false;
    if (run.verdict) {
      const reason = (run.summary && run.summary.reason) || "";
      S.setBadge(document.getElementById("run-verdict"), run.verdict, "verdict", `lr ${run.verdict.replace("_", " ")}`);
      document.querySelector("#run-verdict .verdict").title = reason;
    }
    if (!run.summary) return;
    document.getElementById("analysis-reason").textContent = run.summary.reason || "";
    const list = document.getElementById("analysis");
    list.replaceChildren();
    for (const [key, label] of page.analysis_labels) {
      if (!(key in run.summary)) continue;
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = label;
      dd.textContent = S.fmtNum(run.summary[key]);
      list.append(dt, dd);
    }
    document.getElementById("analysis-section").hidden = false;
  }

  let drawPending = false;
  function drawSoon() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      draw();
    });
  }

  /** Follow the run with Server-Sent Events: new step rows, eval losses and status changes. */
  function follow() {
    const since = lastStep() === null ? -1 : lastStep();
    const events = new EventSource(`/api/runs/${page.id}/events?since_step=${since}`);
    events.addEventListener("steps", (event) => {
      append(JSON.parse(event.data));
      progress.done = Math.max(progress.done, lastStep());
      showProgress();
      drawSoon();
    });
    events.addEventListener("eval", (event) => {
      const batch = JSON.parse(event.data);
      data.evalSteps.push(...batch.steps);
      data.evalLoss.push(...batch.series.eval_loss);
      drawSoon();
    });
    events.addEventListener("status", (event) => {
      const run = JSON.parse(event.data);
      if (run.status === "deleted") {
        events.close();
        return;
      }
      showRun(run);
      if (S.FINISHED.has(run.status)) {
        events.close();
        showFinished(run);
      }
    });
  }

  async function start() {
    const first = S.getJSON(metricsUrl(4000));
    await S.documentParsed; // Plotly is there
    append(await first);
    draw();
    smoothing.addEventListener("input", () => {
      smoothingValue.textContent = Number(smoothing.value).toFixed(2);
      Plotly.restyle("chart-loss", { y: [S.smooth(data.series.loss, Number(smoothing.value))] }, [1]);
    });
    const deleteForm = document.getElementById("delete-form");
    if (deleteForm) {
      deleteForm.addEventListener("submit", (event) => {
        if (!window.confirm(deleteForm.dataset.confirm)) event.preventDefault();
      });
    }
    document.body.dataset.ready = "true"; // for tests: the charts are drawn
    if (!S.FINISHED.has(page.status)) follow();
  }

  start().catch((err) => console.warn(err));
})();
