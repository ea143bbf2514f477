// The model page's chart: requests/s and p50/p99 latency over the last minutes, drawn with
// the vendored uPlot (static/vendor/uplot, loaded as a classic script before this module).

const COLORS = { rps: "#0b57a4", p50: "#146c2e", p99: "#a4161a" };

function options(width) {
  return {
    width,
    height: 220,
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true }, rps: { auto: true, range: (u, lo, hi) => [0, Math.max(1, hi)] },
              ms: { auto: true, range: (u, lo, hi) => [0, Math.max(1, hi)] } },
    series: [
      {},
      { label: "Requests/s", scale: "rps", stroke: COLORS.rps, width: 2 },
      // Latency exists only where requests were answered: show each measurement as a point.
      { label: "p50 (ms)", scale: "ms", stroke: COLORS.p50, width: 1.5,
        points: { show: true, size: 5, fill: COLORS.p50 } },
      { label: "p99 (ms)", scale: "ms", stroke: COLORS.p99, width: 1.5, dash: [6, 4],
        points: { show: true, size: 5, fill: COLORS.p99 } },
    ],
    axes: [
      {},
      { scale: "rps", label: "req/s", stroke: "#1a1d21" },
      { scale: "ms", label: "ms", side: 1, stroke: "#1a1d21", grid: { show: false } },
    ],
  };
}

/** A chart in `el` that `update(series)` redraws; series as /ui/api/models/{name}/activity. */
export function trafficChart(el, spanSeconds = 300) {
  const plot = new window.uPlot(options(Math.max(280, el.clientWidth)), [[], [], [], []], el);
  const resize = () => plot.setSize({ width: Math.max(280, el.clientWidth), height: 220 });
  new ResizeObserver(resize).observe(el);
  return {
    update(series) {
      plot.setData([series.at, series.requests_per_s, series.p50_ms, series.p99_ms]);
      const end = series.at.length ? series.at[series.at.length - 1] : Date.now() / 1000;
      plot.setScale("x", { min: end - spanSeconds, max: end });
    },
  };
}
