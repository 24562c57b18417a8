// The compare, sweep and run pages' answers: per held-out prompt, each run's greedy answer at an eval step (a
// slider picks the step; each run shows its latest answer at or before it), coloured by learning rate as
// the charts are, and the exact-match accuracy over the eval steps. Runs still going are polled.
"use strict";

(() => {
  const S = Stepscope;
  const page = S.pageData();
  const section = document.getElementById("answers");
  if (!section || !page.runs) return;
  const KEY = "eval/exact_match";
  const POLL_MS = 5000;
  const slider = document.getElementById("answers-step");
  const sliderValue = document.getElementById("answers-step-value");
  const table = document.getElementById("answers-table");
  const range = S.lrRange(page.runs.map((r) => r.lr));
  const runs = page.runs.map((r) => ({ ...r, color: S.lrColor(r.lr, range), answers: null, accuracy: null }));
  let steps = [];
  let followLast = true; // the slider stays on the last step until the user moves it

  async function load(run) {
    const [answers, keys] = await Promise.all([
      S.getJSON(`/api/runs/${run.id}/generations`),
      S.getJSON(`/api/runs/${run.id}/metric-keys`),
    ]);
    run.answers = answers;
    // A run that has not scored an answer yet (or never will: a text dataset, an external run) has no such key.
    run.accuracy = keys.custom.includes(KEY)
      ? await S.getJSON(`/api/runs/${run.id}/metrics?keys=${encodeURIComponent(KEY)}`)
      : null;
  }

  /** Every prompt any run answered (the runs of one dataset and seed share them), in order of first sight. */
  function prompts() {
    const seen = new Map();
    for (const run of runs) {
      for (const p of run.answers?.prompts || []) if (!seen.has(p.prompt)) seen.set(p.prompt, p);
    }
    return [...seen.values()];
  }

  /** The run's answer to `prompt` at its last eval step at or before `step`. */
  function answerAt(run, prompt, step) {
    const index = (run.answers?.prompts || []).find((p) => p.prompt === prompt)?.index;
    if (index === undefined) return null;
    let found = null;
    for (const s of run.answers.steps) {
      if (s.step > step) break;
      const a = s.answers.find((x) => x.index === index);
      if (a) found = { ...a, step: s.step };
    }
    return found;
  }

  function header() {
    const row = document.createElement("tr");
    for (const title of ["Prompt", "Expected"]) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = title;
      row.append(th);
    }
    for (const run of runs) {
      const th = document.createElement("th");
      th.scope = "col";
      th.dataset.runId = run.id;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = run.color;
      th.append(swatch, `lr ${S.fmtLr(run.lr)}`);
      th.title = run.name;
      row.append(th);
    }
    table.tHead.replaceChildren(row);
  }

  function body() {
    const step = steps[Number(slider.value)] ?? 0;
    sliderValue.textContent = steps.length ? String(step) : "";
    const rows = prompts().map((p) => {
      const tr = document.createElement("tr");
      const prompt = document.createElement("td");
      prompt.className = "prompt";
      prompt.textContent = p.prompt;
      const expected = document.createElement("td");
      expected.textContent = p.expected ?? "—";
      tr.append(prompt, expected);
      for (const run of runs) {
        const td = document.createElement("td");
        td.className = "answer";
        td.dataset.runId = run.id;
        td.style.borderLeft = `4px solid ${run.color}`;
        const a = answerAt(run, p.prompt, step);
        td.textContent = a ? a.output || "(empty)" : "—";
        if (a && a.exact !== null) td.classList.add(a.exact ? "exact" : "wrong");
        if (a) td.title = `step ${a.step}${a.overlap !== null ? ` · overlap ${S.fmtNum(a.overlap, 2)}` : ""}`;
        tr.append(td);
      }
      return tr;
    });
    table.tBodies[0].replaceChildren(...rows);
  }

  async function chart() {
    await S.documentParsed;
    if (!window.Plotly) return;
    const traces = runs
      .filter((r) => r.accuracy?.steps.length)
      .map((r) => ({
        x: r.accuracy.steps,
        y: r.accuracy.series[KEY],
        mode: "lines+markers",
        name: `lr ${S.fmtLr(r.lr)} · ${r.name}`,
        line: { color: r.color, width: 2 },
        marker: { color: r.color },
      }));
    const layout = S.baseLayout({
      title: { text: "exact-match accuracy (held-out prompts)", font: { size: 13 } },
      xaxis: { title: { text: "step" } },
      yaxis: { range: [-0.05, 1.05], tickformat: ".0%" },
    });
    window.Plotly.react("chart-accuracy", traces, layout, S.plotConfig);
  }

  function draw() {
    steps = [...new Set(runs.flatMap((r) => (r.answers?.steps || []).map((s) => s.step)))].sort((a, b) => a - b);
    section.hidden = steps.length === 0;
    if (!steps.length) return;
    slider.max = String(steps.length - 1);
    if (followLast) slider.value = slider.max;
    header();
    body();
    chart();
  }

  slider.addEventListener("input", () => {
    followLast = Number(slider.value) === steps.length - 1;
    body();
  });

  async function refresh(which) {
    await Promise.all(which.map(load));
    draw();
  }

  refresh(runs).catch((err) => console.warn(err));
  const going = () => runs.filter((r) => !r.finished);
  if (going().length) {
    S.every(POLL_MS, async () => {
      const pending = going();
      // A run's `finished` comes from the page; a run that ended is fetched once more, then left alone.
      const states = await Promise.all(pending.map((r) => S.getJSON(`/api/runs/${r.id}`)));
      states.forEach((state, i) => {
        pending[i].finished = S.FINISHED.has(state.status);
      });
      await refresh(pending);
      return going().length > 0;
    });
  }
})();
