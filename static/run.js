// Run page: charts of one run's metrics, extended live (Server-Sent Events) while the run is going; for an
// LR range test also its loss against the learning rate, with the suggested rates marked.
"use strict";

(() => {
  const S = Stepscope;
  const page = S.pageData();
  const KEYS = ["loss", "eval_loss", "lr", "grad_norm", "update_norm", "update_ratio", "step_scale", "update_cos",
    "grad_alignment", "wall_time"];
  // Smoothed on the server over every recorded step, then continued here on the rows that arrive live.
  const SMOOTHED = ["loss", "update_cos", "grad_alignment"];
  const emptyData = () => ({
    steps: [], series: Object.fromEntries(KEYS.map((k) => [k, []])), evalSteps: [], evalLoss: [],
    smoothed: Object.fromEntries(SMOOTHED.map((k) => [k, []])), state: Object.fromEntries(SMOOTHED.map((k) => [k, [0, 0]])),
  });
  let data = emptyData();
  const smoothing = document.getElementById("smoothing");
  const smoothingValue = document.getElementById("smoothing-value");

  const rangeTest = page.kind === "lr_range_test";

  // One chart per metric; log scale where values span decades (a range test's lr grows exponentially).
  const PANELS = [
    { key: "lr", title: "Learning rate", log: rangeTest, zero: !rangeTest },
    { key: "grad_norm", title: "Gradient norm ‖g‖ (before clipping)", log: true },
    { key: "update_norm", title: "Update norm ‖Δw‖", log: true },
    { key: "update_ratio", title: "Update ratio ‖Δw‖ / ‖w‖", log: true },
    { key: "step_scale", title: "Step scale ‖Δw‖ / (lr · ‖g‖)   (SGD: 1)", log: true, one: true },
    // Cosines, raw and smoothed, around zero: the evidence the verdict reads (analysis/runs.py).
    { key: "grad_alignment", title: "Gradient alignment cos(g_t, θ_{t−1} − θ_t)   (> 0: steps too short, < 0: overshot)", cos: true },
    { key: "update_cos", title: "Update cosine cos(Δθ_t, Δθ_{t−1})   (−1: bouncing across the valley)", cos: true },
  ];

  function lossTraces() {
    const loss = data.series.loss;
    return [
      { x: data.steps, y: loss, name: "loss", mode: "lines", line: { color: "#1f77b4", width: 1 }, opacity: 0.3 },
      { x: data.steps, y: data.smoothed.loss, name: "smoothed", mode: "lines", line: { color: "#1f77b4", width: 2 } },
      { x: data.evalSteps, y: data.evalLoss, name: "eval loss", mode: "lines+markers", line: { color: "#d62728", width: 2 }, marker: { size: 5 } },
    ];
  }

  // Rows arrive by appending to the same arrays; Plotly.react redraws such a trace only when the layout's
  // datarevision changes (it compares arrays by identity), so each draw bumps it.
  let revision = 0;

  function panelLayout(title, log, { zero = false, ...extra } = {}) {
    return S.baseLayout({
      datarevision: revision,
      title: { text: title, font: { size: 14 } },
      xaxis: { title: { text: "step" } },
      yaxis: { type: log ? "log" : "linear", exponentformat: "power", rangemode: zero ? "tozero" : "normal" },
      legend: { x: 1, xanchor: "right", y: 1, bgcolor: "rgba(255,255,255,0.7)" },
      showlegend: false,
      height: 300,
      ...extra,
    });
  }

  // --- LR range test: loss against lr (log x), with the steepest and valley rates marked -------------

  const MARKERS = [
    { key: "valley", label: "valley", color: "#2ca02c", height: 1 },
    { key: "steepest", label: "steepest", color: "#ff7f0e", height: 0.75 }, // lower, so the labels do not overlap
  ];

  function drawRange() {
    const rt = page.range_test || {};
    const weight = rt.smoothing_weight ?? page.range_smoothing; // the analysis' smoothing, not the slider's
    const loss = data.series.loss;
    const smoothed = S.smooth(loss, weight);
    const finite = (v) => v !== null && Number.isFinite(v);
    const low = Math.min(...loss.filter(finite), ...smoothed.filter(finite));
    // Up to the smoothed curve's top: the raw loss of the last steps may be far above it once it blows up.
    const high = Math.max(...smoothed.filter(finite));
    const pad = Number.isFinite(high - low) ? (high - low) * 0.05 || 0.1 : 0.1;
    const traces = [
      { x: data.series.lr, y: loss, name: "loss", mode: "lines", line: { color: "#1f77b4", width: 1 }, opacity: 0.35 },
      { x: data.series.lr, y: smoothed, name: `smoothed (${weight})`, mode: "lines", line: { color: "#1f77b4", width: 2 } },
    ];
    for (const m of MARKERS) {
      const lr = rt[`${m.key}_lr`];
      if (!lr || !Number.isFinite(high)) continue;
      const label = `${m.label} ${S.fmtLr(lr)}${rt.suggested_lr === lr ? " (suggested)" : ""}`;
      traces.push({
        x: [lr, lr],
        y: [low - pad, low + (high - low) * m.height],
        name: label,
        mode: "lines+text",
        text: ["", label],
        textposition: "middle right",
        textfont: { color: m.color },
        line: { color: m.color, dash: "dash", width: 1.5 },
        hoverinfo: "name",
      });
    }
    const layout = panelLayout("Loss against learning rate", false, { showlegend: true, hovermode: "closest" });
    layout.xaxis = { type: "log", title: { text: "learning rate (log scale)" }, exponentformat: "power" };
    if (Number.isFinite(high)) layout.yaxis.range = [low - pad, high + pad];
    Plotly.react("chart-range", traces, layout, S.plotConfig);
  }

  /** The suggestion's text and the sweep button, once the finished test's summary holds them. */
  function showRangeTest(run) {
    const rt = run.summary && run.summary.range_test;
    if (!rt) return;
    page.range_test = rt;
    const text = document.getElementById("range-suggestion");
    if (rt.suggested_lr) {
      const strong = document.createElement("strong");
      strong.textContent = S.fmtLr(rt.suggested_lr);
      const rules = ` (a tenth of the minimum's ${S.fmtLr(rt.min_loss_lr)}; valley ${S.fmtLr(rt.valley_lr)}, steepest ${S.fmtLr(rt.steepest_lr)})`;
      text.replaceChildren("Suggested learning rate: ", strong, rules);
    } else {
      text.textContent = "No suggestion: the smoothed loss never fell over this range. Try a wider one.";
    }
    const rates = rt.sweep_lrs || [];
    if (run.status === "completed" && rates.length) {
      document.getElementById("range-sweep-button").textContent = `Start a sweep of ${rates.length} rates around ${S.fmtLr(rt.suggested_lr)}`;
      document.getElementById("range-sweep-rates").textContent = `${rates.map(S.fmtLr).join(", ")}; the same config otherwise`;
      document.getElementById("range-sweep-form").hidden = false;
    }
    drawRange();
  }

  function draw() {
    revision += 1;
    if (rangeTest) drawRange();
    Plotly.react("chart-loss", lossTraces(), panelLayout("Loss (raw, smoothed) and eval loss", false, { showlegend: true }), S.plotConfig);
    for (const p of PANELS) {
      const trace = { x: data.steps, y: data.series[p.key], mode: "lines", name: p.key, line: { color: "#444", width: 1.5 } };
      const traces = [trace];
      const level = p.one ? 1 : p.cos ? 0 : null;
      const shapes = level === null ? [] : [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: level, y1: level, line: { dash: "dot", color: "#999" } }];
      const extra = { shapes, zero: p.zero };
      if (p.cos) {
        Object.assign(trace, { opacity: 0.3, line: { color: "#444", width: 1 } });
        traces.push({ x: data.steps, y: data.smoothed[p.key], mode: "lines", name: "smoothed", line: { color: "#444", width: 2 } });
        extra.yaxis = { range: [-1.05, 1.05], zeroline: false };
      }
      Plotly.react(`chart-${p.key}`, traces, panelLayout(p.title, p.log, extra), S.plotConfig);
    }
  }

  function append(batch) {
    data.steps.push(...batch.steps);
    for (const k of KEYS) data.series[k].push(...(batch.series[k] || batch.steps.map(() => null)));
    for (const k of SMOOTHED) {
      if (batch.smoothed) {
        data.smoothed[k].push(...batch.smoothed[k]);
        data.state[k] = batch.smoothing_state[k];
      } else {
        data.smoothed[k].push(...S.continueSmooth(data.state[k], batch.series[k] || [], Number(smoothing.value)));
      }
    }
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
    const q = new URLSearchParams({ keys: KEYS.join(","), max_points: maxPoints, smoothing: smoothing.value });
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
  /** A chart per metric of the run's own (a script's `run.log({"accuracy": ...})`), read again when asked. */
  async function drawCustom() {
    const { custom } = await S.getJSON(`/api/runs/${page.id}/metric-keys`);
    if (!custom.length) return;
    const q = new URLSearchParams({ keys: custom.join(","), max_points: 4000 });
    const got = await S.getJSON(`/api/runs/${page.id}/metrics?${q}`);
    for (const key of custom) {
      const id = `chart-custom-${key}`;
      let div = document.getElementById(id);
      if (!div) {
        div = document.createElement("div");
        div.className = "chart custom";
        div.id = id;
        div.setAttribute("aria-label", key);
        document.getElementById("charts").append(div);
      }
      const trace = { x: got.steps, y: got.series[key], mode: "lines", name: key, line: { color: "#444", width: 1.5 }, connectgaps: true };
      Plotly.react(id, [trace], panelLayout(key, false), S.plotConfig);
    }
  }

  function showFinished(run) {
    drawCustom().catch((err) => console.warn(err));
    const cancel = document.getElementById("cancel-form");
    if (cancel) cancel.hidden = true;
    document.getElementById("delete-form").hidden = false;
    if (rangeTest) {
      showRangeTest(run); // a rate that grows by design: the verdict and scores of a constant rate do not apply
      return;
    }
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
    await drawCustom();
    let reload = null;
    smoothing.addEventListener("input", () => {
      smoothingValue.textContent = Number(smoothing.value).toFixed(2);
      clearTimeout(reload); // the server smooths every step again with the new weight
      reload = setTimeout(async () => {
        const fresh = await S.getJSON(metricsUrl(4000));
        data = emptyData();
        append(fresh);
        draw();
      }, 150);
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

// The job's log (GET /api/runs/{id}/logs: a local job's stderr, or the Ray job's log), read when its section
// is opened, and again every few seconds while it stays open on a run that was going when the page loaded.
(() => {
  const details = document.getElementById("job-log");
  if (!details) return;
  const S = Stepscope;
  const page = S.pageData();
  const lines = document.getElementById("job-log-lines");
  const note = document.getElementById("job-log-note");
  const REFRESH_MS = 3000;
  let timer = null;

  async function load() {
    try {
      const log = await S.getJSON(`/api/runs/${page.id}/logs?tail=${details.dataset.tail}`);
      const atEnd = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 4;
      lines.textContent = log.lines.join("\n");
      note.textContent = log.lines.length ? `(last ${log.lines.length} lines, ${log.executor} job)` : "(no log yet)";
      if (log.job) note.replaceChildren(...jobNote(log));
      if (atEnd) lines.scrollTop = lines.scrollHeight; // follow the end unless the reader scrolled up
    } catch (err) {
      note.textContent = `(the log could not be read: ${err.message})`;
    }
    details.dataset.loaded = "true"; // for tests
  }

  /** "(last 200 lines of Ray job <link> · RUNNING · on 10.0.0.5)": where the run's latest attempt runs. */
  function jobNote(log) {
    const link = document.createElement(log.job.url ? "a" : "span");
    link.id = "job-log-job";
    link.textContent = log.job.id;
    if (log.job.url) {
      link.href = log.job.url;
      link.target = "_blank";
      link.rel = "noopener";
    }
    const lines = log.lines.length ? `last ${log.lines.length} lines of` : "no log yet from";
    const where = `${log.job.status}${log.job.node ? ` · on ${log.job.node}` : ""})`;
    return [`(${lines} ${log.executor === "ray" ? "Ray job" : "job"} `, link, ` · ${where}`];
  }

  details.addEventListener("toggle", () => {
    clearInterval(timer);
    if (!details.open) return;
    load();
    if (!S.FINISHED.has(page.status)) timer = setInterval(load, REFRESH_MS);
  });
})();
