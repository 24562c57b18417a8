// The walk down the mountain (issue 13): on a run's page its probes (the loss along probed steps and where it
// was lowest) and which modules moved; on run, compare and sweep pages the loss map of the runs' paths.
"use strict";

(() => {
  const S = Stepscope;
  const SMALL_MULTIPLES = 12; // probes drawn as curves, spread over the run; the best-α line shows them all
  const COLUMNS = 4;
  const MAP_POLL_MS = 1000;
  const STRIDE_RIGHT = [0.8, 1.6]; // best α read as "the stride fitted" (analysis/landscape.py STRIDE_RIGHT)

  // --- cross-sections of steps ---------------------------------------------------------------------

  function spread(items, n) {
    if (items.length <= n) return items;
    return Array.from({ length: n }, (_, i) => items[Math.round((i * (items.length - 1)) / (n - 1))]);
  }

  function drawBestAlpha(probes) {
    const steps = probes.probes.map((p) => p.step);
    const best = probes.probes.map((p) => p.best_alpha);
    const traces = [
      { x: steps, y: best, name: "best α", mode: "lines+markers", line: { color: "#1f77b4", width: 2 }, marker: { size: 5 },
        text: probes.probes.map((p) => p.reading), hovertemplate: "step %{x}: α %{y:.2f}<br>%{text}<extra></extra>" },
    ];
    const layout = S.baseLayout({
      title: { text: "Where along each step the loss was lowest (α; 1: the stride fitted, < 1: too long, > 1: too short)", font: { size: 14 } },
      xaxis: { title: { text: "step" } },
      yaxis: { title: { text: "best α" }, range: [Math.min(-1, ...best.filter((v) => v !== null)) - 0.1, 3.1] },
      shapes: [
        { type: "rect", xref: "paper", x0: 0, x1: 1, y0: STRIDE_RIGHT[0], y1: STRIDE_RIGHT[1], fillcolor: "rgba(44,160,44,0.12)", line: { width: 0 } },
        { type: "line", xref: "paper", x0: 0, x1: 1, y0: 1, y1: 1, line: { color: "#2ca02c", dash: "dash", width: 1 } },
      ],
      showlegend: false,
      hovermode: "closest",
      height: 300,
    });
    Plotly.react("chart-best-alpha", traces, layout, S.plotConfig);
  }

  function drawProbes(probes) {
    const shown = spread(probes.probes, SMALL_MULTIPLES);
    const rows = Math.ceil(shown.length / COLUMNS);
    const traces = [];
    const annotations = [];
    const layout = S.baseLayout({
      title: { text: "The loss along probed steps (probe batch; ● lowest point, | where the step landed)", font: { size: 14 } },
      grid: { rows, columns: COLUMNS, pattern: "independent", ygap: 0.45, xgap: 0.15 },
      showlegend: false,
      hovermode: "closest",
      height: 160 * rows + 80,
      shapes: [],
    });
    shown.forEach((p, i) => {
      const axis = i === 0 ? "" : String(i + 1);
      traces.push({ x: probes.alphas, y: p.losses, mode: "lines+markers", xaxis: `x${axis}`, yaxis: `y${axis}`,
        line: { color: "#1f77b4", width: 2 }, marker: { size: 4 }, name: `step ${p.step}`,
        hovertemplate: `step ${p.step}, α %{x}: loss %{y:.4g}<extra></extra>` });
      if (p.best_alpha !== null) {
        const near = probes.alphas.reduce((a, b) => (Math.abs(b - p.best_alpha) < Math.abs(a - p.best_alpha) ? b : a));
        traces.push({ x: [p.best_alpha], y: [p.losses[probes.alphas.indexOf(near)]], mode: "markers", xaxis: `x${axis}`,
          yaxis: `y${axis}`, marker: { size: 9, color: "#d62728" }, hovertemplate: `${p.reading}<extra></extra>` });
      }
      layout[`xaxis${axis}`] = { range: [-1.1, 3.1], dtick: 1, tickfont: { size: 10 } };
      layout[`yaxis${axis}`] = { tickfont: { size: 10 }, exponentformat: "power" };
      layout.shapes.push({ type: "line", xref: `x${axis}`, yref: `y${axis} domain`, x0: 1, x1: 1, y0: 0, y1: 1,
        line: { color: "#999", width: 1, dash: "dot" } });
      const a = p.best_alpha === null ? "—" : p.best_alpha.toFixed(2);
      annotations.push({ text: `step ${p.step}: α ${a}`, xref: `x${axis} domain`, yref: `y${axis} domain`, x: 0.5, y: 1.18,
        showarrow: false, font: { size: 11 } });
    });
    layout.annotations = annotations;
    Plotly.react("chart-probes", traces, layout, S.plotConfig);
  }

  // --- which modules moved ---------------------------------------------------------------------------

  function log10(v) {
    return v !== null && v > 0 ? Math.log10(v) : null;
  }

  function drawModules(mod) {
    const columns = [];
    mod.tensors.forEach((_, i) => {
      const name = `${mod.modules[i]}.${mod.matrices[i]}`;
      if (!columns.includes(name)) columns.push(name);
    });
    const layers = [...new Set(mod.layers.filter((l) => l !== null))].sort((a, b) => a - b);
    const slider = document.getElementById("modules-step");
    const label = document.getElementById("modules-step-value");
    const following = slider.dataset.ready !== "true" || slider.value === slider.max; // at the newest step: stay there
    slider.max = String(mod.steps.length - 1);
    if (following) slider.value = slider.max;
    slider.dataset.ready = "true";

    function drawStep() {
      const at = Number(slider.value);
      label.textContent = String(mod.steps[at]);
      const z = layers.map(() => columns.map(() => null));
      const text = layers.map(() => columns.map(() => ""));
      mod.tensors.forEach((name, i) => {
        const row = layers.indexOf(mod.layers[i]);
        const col = columns.indexOf(`${mod.modules[i]}.${mod.matrices[i]}`);
        if (row < 0) return;
        const ratio = mod.update_ratios[at][i];
        z[row][col] = log10(ratio);
        text[row][col] = `${name}<br>‖Δw‖/‖w‖ ${ratio === null ? "—" : ratio.toExponential(2)}`;
      });
      Plotly.react("chart-modules", [{ type: "heatmap", x: columns, y: layers.map((l) => `layer ${l}`), z, text,
        hovertemplate: "%{text}<extra></extra>", colorscale: "Viridis", colorbar: { title: { text: "log₁₀ ratio" } } }],
      S.baseLayout({ title: { text: `Update ratio by layer and module at step ${mod.steps[at]}`, font: { size: 14 } },
        height: Math.max(260, 22 * layers.length + 120), hovermode: "closest", yaxis: { autorange: "reversed" } }),
      S.plotConfig);
    }
    slider.oninput = drawStep;
    drawStep();

    // Every tensor over steps: rows grouped by module and matrix, layers in order within each group.
    const order = mod.tensors.map((_, i) => i).sort((a, b) => {
      const ka = columns.indexOf(`${mod.modules[a]}.${mod.matrices[a]}`);
      const kb = columns.indexOf(`${mod.modules[b]}.${mod.matrices[b]}`);
      return ka - kb || (mod.layers[a] ?? 0) - (mod.layers[b] ?? 0);
    });
    const z = order.map((i) => mod.steps.map((_, t) => log10(mod.update_ratios[t][i])));
    Plotly.react("chart-modules-steps", [{ type: "heatmap", x: mod.steps, y: order.map((i) => mod.tensors[i]), z,
      colorscale: "Viridis", colorbar: { title: { text: "log₁₀ ratio" } },
      hovertemplate: "%{y}<br>step %{x}: log₁₀ ratio %{z:.2f}<extra></extra>" }],
    S.baseLayout({ title: { text: "Update ratio of each LoRA tensor over steps", font: { size: 14 } },
      height: Math.max(300, 9 * order.length + 120), hovermode: "closest", margin: { l: 230, r: 20, t: 36, b: 40 },
      yaxis: { autorange: "reversed", tickfont: { size: 9 } }, xaxis: { title: { text: "step" } } }),
    S.plotConfig);
  }

  const WALK_POLL_MS = 15000; // while the run trains: probes and module norms arrive every few dozen steps

  async function showWalk(section) {
    await drawWalk(section);
    if (section.dataset.finished === "true") return;
    S.every(WALK_POLL_MS, async () => {
      const run = await S.getJSON(`/api/runs/${section.dataset.runId}`);
      await drawWalk(section);
      return !S.FINISHED.has(run.status); // one last draw after it ended, then stop
    });
  }

  async function drawWalk(section) {
    const id = section.dataset.runId;
    const [probes, modules] = await Promise.all([S.getJSON(`/api/runs/${id}/probes`), S.getJSON(`/api/runs/${id}/modules`)]);
    await S.documentParsed;
    const reading = document.getElementById("probe-reading");
    if (probes.probes.length) {
      reading.textContent = `${probes.reading} (median over the second half of ${probes.probes.length} probes)`;
      drawBestAlpha(probes);
      drawProbes(probes);
    } else {
      reading.textContent = "No probes recorded (probe_every was 0, or the run has not reached its first step).";
    }
    if (modules.steps.length) drawModules(modules);
    section.dataset.ready = "true";
  }

  // --- the loss map ------------------------------------------------------------------------------------

  function drawMap(result) {
    const range = S.lrRange(result.paths.map((p) => p.learning_rate));
    const traces = [
      { type: "contour", x: result.xs, y: result.ys, z: result.losses, colorscale: "Greys", reversescale: true,
        opacity: 0.75, contours: { coloring: "heatmap", showlabels: true, labelfont: { size: 10, color: "#333" } },
        colorbar: { title: { text: "probe loss" } }, hovertemplate: "loss %{z:.4g}<extra></extra>", name: "loss" },
    ];
    for (const path of result.paths) {
      const color = S.lrColor(path.learning_rate, range);
      traces.push({ type: "scatter", mode: "lines+markers", x: path.x, y: path.y, name: `run ${path.run_id}, lr ${S.fmtLr(path.learning_rate)}`,
        line: { color, width: 3 }, marker: { size: 6, color }, text: path.steps.map((s) => `step ${s}`),
        hovertemplate: `run ${path.run_id} (lr ${S.fmtLr(path.learning_rate)}), %{text}<extra></extra>`, meta: "path" });
      const last = path.x.length - 1;
      traces.push({ type: "scatter", mode: "markers", x: [path.x[last]], y: [path.y[last]], showlegend: false,
        marker: { size: 12, color, symbol: "x", line: { width: 1, color: "#000" } }, hoverinfo: "skip" });
    }
    traces.push({ type: "scatter", mode: "markers", x: [0], y: [0], name: "start", marker: { size: 14, symbol: "star", color: "#d62728" },
      hovertemplate: `start: loss ${S.fmtNum(result.centre_loss)}<extra></extra>` });
    const explained = (100 * result.explained).toFixed(0);
    const el = document.getElementById("chart-map");
    el.hidden = false;
    Plotly.react(el, traces, S.baseLayout({
      title: { text: `Loss map: the plane holds ${explained}% of the paths' movement`, font: { size: 14 } },
      xaxis: { title: { text: "direction 1" }, zeroline: false }, yaxis: { title: { text: "direction 2" }, zeroline: false },
      hovermode: "closest", height: 560, legend: { orientation: "v", x: 1.12, y: 1 },
    }), S.plotConfig);
    el.dataset.paths = String(result.paths.length);
  }

  function followMap(section, id) {
    const status = document.getElementById("map-status");
    const button = document.getElementById("map-button");
    section.dataset.mapId = String(id);
    S.every(MAP_POLL_MS, async () => {
      const map = await S.getJSON(`/api/maps/${id}`);
      if (map.status === "completed") {
        await S.documentParsed;
        status.textContent = `${map.result.paths.length} path${map.result.paths.length > 1 ? "s" : ""} on a ${map.resolution}×${map.resolution} grid, made in ${S.fmtDuration(map.result.seconds)}.`;
        button.hidden = true;
        drawMap(map.result);
        section.dataset.ready = "true";
        return false;
      }
      if (map.status === "failed") {
        status.textContent = map.error || "The map failed.";
        button.hidden = false;
        button.disabled = false;
        return false;
      }
      status.textContent = `Making the map: ${Math.round(100 * map.progress)}% of the grid…`;
      return true;
    });
  }

  function setUpMap(section) {
    const form = document.getElementById("map-form");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = document.getElementById("map-button");
      const status = document.getElementById("map-status");
      button.disabled = true;
      status.textContent = "Starting the map…";
      const response = await fetch(form.action, { method: "POST", body: new FormData(form), headers: { Accept: "application/json" } });
      const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
      if (!response.ok) {
        status.textContent = `No map: ${answer.error || response.status}`;
        button.disabled = false;
        return;
      }
      followMap(section, answer.id);
    });
    if (section.dataset.mapId) followMap(section, section.dataset.mapId);
  }

  const walk = document.getElementById("walk");
  if (walk) showWalk(walk).catch((err) => console.warn(err));
  const mapSection = document.getElementById("map-section");
  if (mapSection) setUpMap(mapSection);
})();
