// The playground: the prompt goes to POST /playground/generate, whose answer is newline-delimited JSON events
// (`start` with the columns, `token` pieces round robin, `end`, `done` or `error`); each column fills as its
// tokens arrive. Columns are coloured by learning rate like the compare page (the base model in grey).
"use strict";

(() => {
  const S = Stepscope;
  const page = S.pageData();
  const form = document.getElementById("playground-form");
  const columns = document.getElementById("playground-answers");
  const status = document.getElementById("playground-status");
  const button = document.getElementById("generate");
  const boxes = [...form.querySelectorAll('input[name="run"]')];
  const range = S.lrRange(page.runs.map((r) => r.lr));
  const byId = new Map(page.runs.map((r) => [r.id, r]));
  const BASE_COLOR = "#999";

  for (const swatch of form.querySelectorAll(".swatch[data-lr]")) {
    swatch.style.background = S.lrColor(Number(swatch.dataset.lr), range);
  }

  // At most max_runs runs: the other boxes are disabled while that many are ticked.
  function limitRuns() {
    const ticked = boxes.filter((b) => b.checked).length;
    for (const b of boxes) b.disabled = !b.checked && ticked >= page.max_runs;
  }
  boxes.forEach((b) => b.addEventListener("change", limitRuns));
  limitRuns();

  function request() {
    // Columns by learning rate, low to high, as the compare page orders runs.
    const runIds = boxes
      .filter((b) => b.checked)
      .map((b) => Number(b.value))
      .sort((a, b) => byId.get(a).lr - byId.get(b).lr || a - b);
    const body = {
      prompt: form.prompt.value,
      run_ids: runIds,
      base: form.base.checked,
      chat: form.chat.checked,
      max_new_tokens: Number(form.max_new_tokens.value),
      temperature: Number(form.temperature.value),
      top_p: Number(form.top_p.value),
      seed: Number(form.seed.value),
    };
    if (!runIds.length) body.model = form.model.value;
    return body;
  }

  function column(source) {
    const card = document.createElement("article");
    card.className = "playground-answer";
    card.dataset.key = source.key;
    const run = source.run_id === null ? null : byId.get(source.run_id);
    card.style.borderTopColor = run ? S.lrColor(run.lr, range) : BASE_COLOR;
    const title = document.createElement("h3");
    title.textContent = run ? `#${run.id} ${run.name} · lr ${S.fmtLr(run.lr)}` : `base: ${source.model}`;
    const text = document.createElement("pre");
    text.className = "answer-text";
    card.append(title, text);
    return card;
  }

  function problem(answer, detail) {
    if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    return detail || `HTTP ${answer.status}`;
  }

  async function generate(event) {
    event.preventDefault();
    button.disabled = true;
    status.textContent = "Loading the models…";
    columns.replaceChildren();
    const cards = new Map();
    try {
      const answer = await fetch("/playground/generate", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/x-ndjson", "X-CSRF-Token": form.dataset.csrf },
        body: JSON.stringify(request()),
      });
      if (!answer.ok) {
        const detail = await answer.json().catch(() => ({}));
        status.textContent = `Not generated: ${problem(answer, detail.detail)}`;
        return;
      }
      const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += value;
        const lines = buffered.split("\n");
        buffered = lines.pop();
        for (const line of lines.filter(Boolean)) handle(JSON.parse(line), cards);
      }
    } catch (err) {
      status.textContent = `Not generated: ${err}`;
    } finally {
      button.disabled = false;
    }
  }

  function handle(event, cards) {
    if (event.event === "start") {
      for (const source of event.sources) {
        const card = column(source);
        cards.set(source.key, card);
        columns.append(card);
      }
      status.textContent = "Generating…";
    } else if (event.event === "token") {
      cards.get(event.key).querySelector("pre").textContent += event.text;
    } else if (event.event === "end") {
      cards.get(event.key).classList.add("done");
    } else if (event.event === "done") {
      status.textContent = "Done.";
    } else if (event.event === "error") {
      status.textContent = `Generation failed: ${event.detail}`;
    }
  }

  form.addEventListener("submit", generate);
})();
