// Helpers shared by the dashboard's pages: number formats, smoothing, colours, fetching, Plotly defaults.
// Every user-provided string goes into the page with textContent, never innerHTML.
"use strict";

const Stepscope = (() => {
  /** A learning rate as people write it: 3e-4, 1.5e-3 (app/pages.py fmt_lr writes the same). */
  function fmtLr(value) {
    if (value === null || value === undefined) return "—";
    if (!Number.isFinite(value) || value <= 0) return String(value);
    const [mantissa, exponent] = value.toExponential(2).split("e");
    return `${mantissa.replace(/\.?0+$/, "")}e${Number(exponent)}`;
  }

  function fmtNum(value, digits = 4) {
    if (value === null || value === undefined) return "—";
    if (!Number.isFinite(value)) return String(value);
    return Number(value.toPrecision(digits)).toString();
  }

  function fmtDuration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return "";
    const s = Math.round(seconds);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    return m ? `${m}m ${String(s % 60).padStart(2, "0")}s` : `${s}s`;
  }

  /**
   * Debiased exponential moving average, as TensorBoard draws it (app/analysis.py ema_smooth is the
   * same): missing values (null, NaN) stay missing and do not count; dividing by 1 - w^(i+1) removes
   * the pull towards the zero start; a constant series is returned as it is.
   */
  function smooth(values, weight) {
    if (weight <= 0 || values.every((v) => v === values[0])) return values.slice();
    let last = 0;
    let i = 0;
    return values.map((v) => {
      if (v === null || !Number.isFinite(v)) return null;
      last = last * weight + (1 - weight) * v;
      i += 1;
      return last / (1 - weight ** i);
    });
  }

  /**
   * Continue the server's smoothing (`smoothed` and `smoothing_state` of /api/runs/{id}/metrics, run over
   * every recorded step) on rows that arrived since: `state` is [EMA sum, values folded in], updated in place.
   */
  function continueSmooth(state, values, weight) {
    return values.map((v) => {
      if (v === null || !Number.isFinite(v)) return null;
      state[0] = state[0] * weight + (1 - weight) * v;
      state[1] += 1;
      return state[0] / (1 - weight ** state[1]);
    });
  }

  // Plasma, stopped before its pale yellow end so that every line shows on a white background.
  const COLORSCALE = [
    [0, "#0d0887"],
    [0.25, "#6a00a8"],
    [0.5, "#b12a90"],
    [0.75, "#e16462"],
    [1, "#f89540"],
  ];

  function hexToRgb(hex) {
    const n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }

  /** The colour of position t (0..1) on COLORSCALE. */
  function colorAt(t) {
    const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0.5));
    for (let k = 1; k < COLORSCALE.length; k += 1) {
      const [t1, c1] = COLORSCALE[k];
      if (x <= t1) {
        const [t0, c0] = COLORSCALE[k - 1];
        const f = (x - t0) / (t1 - t0);
        const a = hexToRgb(c0);
        const b = hexToRgb(c1);
        const mix = a.map((v, j) => Math.round(v + f * (b[j] - v)));
        return `rgb(${mix.join(",")})`;
      }
    }
    return COLORSCALE[COLORSCALE.length - 1][1];
  }

  /** log10 range of the learning rates, widened when they are all equal. */
  function lrRange(rates) {
    const logs = rates.filter((r) => r > 0).map(Math.log10);
    let lo = Math.min(...logs);
    let hi = Math.max(...logs);
    if (!Number.isFinite(lo)) return [-4, -3];
    if (hi - lo < 1e-9) {
      lo -= 0.5;
      hi += 0.5;
    }
    return [lo, hi];
  }

  function lrColor(lr, range) {
    return colorAt((Math.log10(lr) - range[0]) / (range[1] - range[0]));
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  function pageData() {
    const el = document.getElementById("page-data");
    return el ? JSON.parse(el.textContent) : {};
  }

  /** Replace an element's content with a badge: class `${kind} ${kind}-${value}`, text `text`. */
  function setBadge(container, value, kind = "status", text = value) {
    if (!container) return;
    const badge = document.createElement("span");
    badge.className = `${kind} ${kind}-${String(value).replace(/[^a-z0-9_-]/gi, "")}`;
    badge.textContent = text;
    container.replaceChildren(badge);
  }

  /**
   * Resolves once the document is parsed. The page scripts come before Plotly's 4.6 MB script, so
   * their first data request runs while Plotly downloads and compiles; they await this before drawing.
   */
  const documentParsed = new Promise((resolve) => {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", resolve);
    else resolve();
  });

  const FINISHED = new Set(["completed", "failed", "cancelled", "diverged", "interrupted"]);

  const plotConfig = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

  function baseLayout(extra) {
    return {
      margin: { l: 60, r: 20, t: 36, b: 40 },
      font: { family: "system-ui, sans-serif", size: 12 },
      hovermode: "x unified",
      legend: { orientation: "h", y: -0.15 },
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "#fff",
      ...extra,
    };
  }

  /** Calls fn every `ms` until it returns false; waits for one call to end before the next starts. */
  function every(ms, fn) {
    let stopped = false;
    async function tick() {
      if (stopped) return;
      let again = true;
      try {
        again = (await fn()) !== false;
      } catch (err) {
        console.warn(err); // a missed poll is not fatal: the next one catches up
      }
      if (again && !stopped) setTimeout(tick, ms);
    }
    setTimeout(tick, ms);
    return () => {
      stopped = true;
    };
  }

  return {
    fmtLr,
    fmtNum,
    fmtDuration,
    smooth,
    continueSmooth,
    COLORSCALE,
    colorAt,
    lrRange,
    lrColor,
    getJSON,
    pageData,
    setBadge,
    FINISHED,
    documentParsed,
    plotConfig,
    baseLayout,
    every,
  };
})();
