// Compare and sweep pages: runs overlaid, coloured by learning rate (log scale), with linked panels for
// lr, gradient norm, update ratio and step scale. Runs still going are polled once a second; as they end,
// their scores fill the table and a sweep's recommendation is fetched again.
//
// Data comes in two requests: the loss curves first (what the page is for: drawn, the page responds),
// then the panels' four series. Each request is downsampled on the server keeping every bucket's
// minimum and maximum of each series, so fewer series per request also keep more detail per series.
"use strict";

(() => {
  const S = Stepscope;
  const page = S.pageData();
  const PARTS = { main: ["loss"], panels: ["lr", "grad_norm", "update_ratio", "step_scale", "grad_alignment"] };
  const MAX_POINTS = 1000;
  // Stacked panels sharing one x axis, so zooming one zooms all. `size` is the share of the height.
  const PANELS = [
    { key: "loss", title: "loss", size: 0.34 },
    { key: "lr", title: "lr", size: 0.13, log: true },
    { key: "grad_norm", title: "‖g‖", size: 0.13, log: true },
    { key: "update_ratio", title: "‖Δw‖/‖w‖", size: 0.13, log: true },
    { key: "step_scale", title: "‖Δw‖/(lr·‖g‖)", size: 0.13, log: true, one: true },
    // cos(g_t, θ_{t−1} − θ_t), smoothed: above zero the steps were too short, below they overshot.
    { key: "grad_alignment", title: "alignment", size: 0.14, zero: true, smoothed: true },
  ];
  const X_TITLES = { step: "step", epoch: "epoch", samples: "samples seen", wall_time: "wall time (s)" };
  const controls = {
    smoothing: document.getElementById("smoothing"),
    smoothingValue: document.getElementById("smoothing-value"),
    xAxis: document.getElementById("x-axis"),
    logY: document.getElementById("log-y"),
  };
  const empty = () => ({ steps: [], series: {} });
  const runs = page.runs.map((r) => ({ ...r, main: empty(), panels: empty() }));
  const range = S.lrRange(runs.map((r) => r.lr));
  for (const r of runs) r.color = S.lrColor(r.lr, range);

  function label(run) {
    return `lr ${S.fmtLr(run.lr)} · ${run.name}`;
  }

  function xKey() {
    return controls.xAxis.value;
  }

  /** The x values of a part's points: its steps, or the chosen series (empty until that is loaded). */
  function xs(part) {
    return xKey() === "step" ? part.steps : part.series[xKey()] || [];
  }

  function runTraces(run, weight) {
    if (!run.main.steps.length) {
      // No steps yet (queued): a placeholder point keeps the run in the legend, Plotly drops empty traces.
      return [{ x: [null], y: [null], mode: "lines", name: label(run), legendgroup: String(run.id), line: { color: run.color, width: 2 } }];
    }
    const out = [];
    PANELS.forEach((p, i) => {
      const part = p.key === "loss" ? run.main : run.panels;
      const common = { x: xs(part), mode: "lines", xaxis: "x", yaxis: i ? `y${i + 1}` : "y", legendgroup: String(run.id), name: label(run) };
      const y = part.series[p.key] || [];
      if (p.key === "loss") {
        if (weight > 0) {
          out.push({ ...common, y, showlegend: false, hoverinfo: "skip", opacity: 0.2, line: { color: run.color, width: 1 } });
        }
        const smoothed = run.main.smoothed?.loss || S.smooth(y, weight); // the server's, over every step
        out.push({ ...common, y: smoothed, showlegend: true, line: { color: run.color, width: 2 } });
      } else if (p.smoothed) {
        const smoothed = part.smoothed?.[p.key] || S.smooth(y, weight);
        out.push({ ...common, y: smoothed, showlegend: false, line: { color: run.color, width: 1.5 } });
      } else {
        out.push({ ...common, y, showlegend: false, line: { color: run.color, width: 1.5 } });
      }
    });
    return out;
  }

  /** An invisible trace whose only job is the colour bar: log10(lr) with the runs' rates as ticks. */
  function colorbarTrace() {
    const rates = [...new Set(runs.map((r) => r.lr))];
    return {
      x: [null, null],
      y: [null, null],
      mode: "markers",
      showlegend: false,
      hoverinfo: "skip",
      marker: {
        color: range,
        cmin: range[0],
        cmax: range[1],
        colorscale: S.COLORSCALE,
        showscale: true,
        colorbar: {
          title: { text: "lr" },
          tickvals: rates.map(Math.log10),
          ticktext: rates.map(S.fmtLr),
          len: PANELS[0].size,
          y: 1,
          yanchor: "top",
          thickness: 12,
        },
      },
    };
  }

  function layout() {
    const gap = 0.03;
    let top = 1;
    const lay = S.baseLayout({
      height: 900,
      margin: { l: 70, r: 20, t: 20, b: 50 },
      hovermode: "closest",
      legend: { orientation: "h", x: 0, y: -0.06, yanchor: "top" },
      xaxis: { title: { text: X_TITLES[controls.xAxis.value] }, anchor: `y${PANELS.length}` },
      shapes: [],
    });
    PANELS.forEach((p, i) => {
      const bottom = Math.max(0, top - p.size + (i ? gap / 2 : 0));
      const log = p.key === "loss" ? controls.logY.checked : p.log;
      lay[i ? `yaxis${i + 1}` : "yaxis"] = {
        domain: [bottom, top - (i ? gap / 2 : 0)],
        type: log ? "log" : "linear",
        title: { text: p.title },
        exponentformat: "power",
        anchor: "x",
      };
      if (p.one || p.zero) {
        const level = p.one ? 1 : 0;
        lay.shapes.push({ type: "line", xref: "paper", yref: `y${i + 1}`, x0: 0, x1: 1, y0: level, y1: level, line: { dash: "dot", color: "#888" } });
      }
      top = bottom - gap / 2;
    });
    return lay;
  }

  function draw() {
    const weight = Number(controls.smoothing.value);
    const data = runs.flatMap((r) => runTraces(r, weight));
    data.push(colorbarTrace());
    const drawn = Plotly.react("chart-compare", data, layout(), S.plotConfig);
    if (page.sweep !== null) drawValley();
    return drawn;
  }

  // --- sweep: final loss against learning rate -----------------------------------------------------

  function drawValley() {
    const sorted = [...runs].sort((a, b) => a.lr - b.lr);
    const ok = sorted.filter((r) => Number.isFinite(r.final_loss) && !["diverged", "failed"].includes(r.status));
    const bad = sorted.filter((r) => !ok.includes(r));
    const finite = ok.map((r) => r.final_loss);
    const top = finite.length ? Math.max(...finite) : 1;
    const traces = [
      {
        x: ok.map((r) => r.lr),
        y: ok.map((r) => r.final_loss),
        text: ok.map((r) => `${r.name} (${r.status})`),
        mode: "lines+markers",
        name: "final loss",
        marker: { size: 10, color: ok.map((r) => r.color) },
        line: { color: "#999" },
      },
      {
        x: ok.map((r) => r.lr),
        y: ok.map((r) => r.best_loss),
        mode: "lines+markers",
        name: "best loss",
        line: { color: "#bbb", dash: "dot" },
        marker: { size: 6, color: "#bbb" },
      },
    ];
    if (bad.length) {
      traces.push({
        x: bad.map((r) => r.lr),
        y: bad.map(() => top),
        text: bad.map((r) => `${r.name}: ${r.status}`),
        mode: "markers",
        name: "diverged / failed",
        marker: { symbol: "x", size: 12, color: "#d62728" },
      });
    }
    const lay = S.baseLayout({
      title: { text: "Final loss against learning rate", font: { size: 14 } },
      height: 340,
      hovermode: "closest",
      xaxis: { type: "log", title: { text: "learning rate" }, exponentformat: "power" },
      yaxis: { type: controls.logY.checked ? "log" : "linear", title: { text: "loss" } },
      legend: { orientation: "h", y: -0.3 },
      shapes: [],
    });
    const a = page.analysis || {};
    if (a.ok_range) {
      lay.shapes.push({ type: "rect", xref: "x", yref: "paper", x0: a.ok_range[0], x1: a.ok_range[1], y0: 0, y1: 1, fillcolor: "#2ca02c", opacity: 0.08, line: { width: 0 } });
    }
    if (a.recommended_lr) {
      lay.shapes.push({ type: "line", xref: "x", yref: "paper", x0: a.recommended_lr, x1: a.recommended_lr, y0: 0, y1: 1, line: { color: "#2ca02c", dash: "dash" } });
    }
    Plotly.react("chart-valley", traces, lay, S.plotConfig);
  }

  // --- table --------------------------------------------------------------------------------------

  function median(values) {
    const v = values.filter((x) => x !== null && Number.isFinite(x)).sort((a, b) => a - b);
    if (!v.length) return null;
    const mid = Math.floor(v.length / 2);
    return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
  }

  function fmtScore(value) {
    return Number.isInteger(value) ? String(value) : S.fmtNum(value, 3);
  }

  function updateRow(run) {
    const row = document.querySelector(`#compare-table tr[data-run-id="${run.id}"]`);
    if (!row) return;
    row.querySelector(".swatch").style.background = run.color;
    if (run.live || row.querySelector(".cell-step-scale").textContent === "—") {
      // Before the analysis exists: the median of the plotted (possibly downsampled) values.
      row.querySelector(".cell-step-scale").textContent = S.fmtNum(median(run.panels.series.step_scale || []), 3);
    }
    if (run.live && run.summary) {
      // The run ended: its analysis, as the page shows it after a reload.
      for (const cell of row.querySelectorAll("[data-score]")) cell.textContent = fmtScore(run.summary[cell.dataset.score] ?? null);
      const verdict = row.querySelector(".cell-verdict");
      if (run.verdict) {
        S.setBadge(verdict, run.verdict, "verdict", `lr ${run.verdict.replace("_", " ")}`);
        verdict.firstChild.title = run.summary.reason || "";
      }
    }
    if (run.live) {
      S.setBadge(row.querySelector(".cell-status"), run.status);
      row.querySelector(".cell-steps").textContent = `${run.steps_done} / ${run.total_steps || "?"}`;
      row.querySelector(".cell-last-loss").textContent = S.fmtNum(run.final_loss);
      row.querySelector(".cell-best-loss").textContent = S.fmtNum(run.best_loss);
    }
  }

  // --- data ---------------------------------------------------------------------------------------

  function keys(part) {
    return xKey() === "step" ? PARTS[part] : [...PARTS[part], xKey()];
  }

  /** One compare request for a part (its series, and the chosen x series) of every run. */
  async function load(part) {
    const q = new URLSearchParams({ ids: runs.map((r) => r.id).join(","), keys: keys(part).join(","), max_points: MAX_POINTS });
    q.set("smoothing", controls.smoothing.value); // the loss and the alignment: smoothed over every step, not the points
    const answer = await S.getJSON(`/api/compare?${q}`);
    for (const item of answer.runs) {
      const run = runs.find((r) => r.id === item.id);
      if (run) run[part] = { steps: item.steps, series: item.series, smoothed: item.smoothed, state: item.smoothing_state };
    }
  }

  function append(part, batch, wanted) {
    part.steps.push(...batch.steps);
    for (const k of wanted) {
      part.series[k] = part.series[k] || [];
      part.series[k].push(...(batch.series[k] || batch.steps.map(() => null)));
    }
  }

  async function pollRun(run) {
    const info = await S.getJSON(`/api/runs/${run.id}`);
    const all = [...new Set([...keys("main"), ...keys("panels")])];
    const q = new URLSearchParams({ keys: all.join(",") });
    const last = run.main.steps.length ? run.main.steps[run.main.steps.length - 1] : null;
    if (last !== null) q.set("since_step", last);
    const batch = await S.getJSON(`/api/runs/${run.id}/metrics?${q}`);
    if (last === null) {
      run.main = empty(); // a run that had no steps: both parts start from the same rows
      run.panels = empty();
    }
    append(run.main, batch, keys("main"));
    const weight = Number(controls.smoothing.value);
    if (run.main.smoothed) run.main.smoothed.loss.push(...S.continueSmooth(run.main.state.loss, batch.series.loss || [], weight));
    if (run.panels.smoothed) {
      const k = "grad_alignment";
      run.panels.smoothed[k].push(...S.continueSmooth(run.panels.state[k], batch.series[k] || [], weight));
    }
    append(run.panels, batch, keys("panels"));
    Object.assign(run, {
      live: true,
      status: info.status,
      steps_done: info.steps_done,
      total_steps: info.total_steps,
      final_loss: info.summary?.final_loss ?? info.last_loss, // smoothed once the analysis exists
      best_loss: info.summary?.best_loss ?? info.best_loss,
      summary: info.summary,
      verdict: info.verdict,
      finished: S.FINISHED.has(info.status),
    });
    updateRow(run);
  }

  // --- sweep: the recommendation, fetched again whenever a run ends ----------------------------------

  function showRecommendation(a) {
    const parts = [];
    if (a.recommended_lr) {
      const line = document.createElement("p");
      const strong = document.createElement("strong");
      line.id = "recommended-lr";
      strong.textContent = S.fmtLr(a.recommended_lr);
      line.append("Recommended learning rate: ", strong);
      if (a.ok_range) line.append(` · rates that trained well: ${S.fmtLr(a.ok_range[0])} to ${S.fmtLr(a.ok_range[1])}`);
      parts.push(line);
    }
    const sentence = document.createElement("p");
    sentence.id = "recommendation-sentence";
    sentence.textContent = a.sentence;
    parts.push(sentence);
    document.getElementById("recommendation").replaceChildren(...parts);
    for (const row of document.querySelectorAll("#compare-table tbody tr")) {
      row.classList.toggle("recommended", Number(row.dataset.runId) === a.recommended_run_id);
    }
  }

  async function refreshRecommendation() {
    page.analysis = await S.getJSON(`/api/sweeps/${page.sweep}/summary`);
    showRecommendation(page.analysis);
  }

  let reloading = null; // the x axis changed: both parts are fetched again, and polls wait for that

  async function poll() {
    if (reloading) await reloading;
    const active = runs.filter((r) => !r.finished);
    await Promise.all(active.map(pollRun));
    if (page.sweep !== null && active.some((r) => r.finished)) await refreshRecommendation();
    draw();
    const still = runs.filter((r) => !r.finished).length;
    document.getElementById("live-note").textContent = still ? `${still} run${still > 1 ? "s" : ""} still going: updating live` : "";
    return still > 0;
  }

  async function changeX() {
    reloading = (async () => {
      await load("main");
      await draw();
      await load("panels");
      await draw();
    })();
    await reloading;
    reloading = null;
  }

  async function start() {
    const first = load("main");
    await S.documentParsed; // Plotly is there
    await first;
    await draw();
    let reload = null;
    controls.smoothing.addEventListener("input", () => {
      controls.smoothingValue.textContent = Number(controls.smoothing.value).toFixed(2);
      clearTimeout(reload); // the server smooths every step again with the new weight
      reload = setTimeout(() => Promise.all([load("main"), load("panels")]).then(draw).catch((err) => console.warn(err)), 150);
    });
    controls.xAxis.addEventListener("change", () => changeX().catch((err) => console.warn(err)));
    controls.logY.addEventListener("change", draw);
    window.stepscopeReadyAt = performance.now(); // bench/ui.py: time to interactive, from navigation start
    await load("panels");
    await draw();
    runs.forEach(updateRow);
    window.stepscopePanelsAt = performance.now();
    document.body.dataset.ready = "true"; // for tests and bench/ui.py: every panel is drawn
    if (runs.some((r) => !r.finished)) S.every(1000, poll);
  }

  start().catch((err) => console.warn(err));
})();
