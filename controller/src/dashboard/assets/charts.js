// Fledge dashboard charts: inline SVG line charts, no dependencies.
// FledgeCharts.line(container, {title, unit, series: [{name, cls, color, points: [[ms, value|null], ...], step}],
//                               yMin, yMax, xMin, xMax})
"use strict";
window.FledgeCharts = (function () {
  const W = 600, H = 190, L = 46, R = 12, T = 10, B = 24;

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  function niceTicks(min, max, count) {
    if (!(max > min)) { max = min + 1; }
    const raw = (max - min) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) { ticks.push(+v.toFixed(10)); }
    return ticks;
  }

  function fmt(v) {
    if (Math.abs(v) >= 1000) { return (v / 1000).toFixed(v % 1000 === 0 ? 0 : 1) + "k"; }
    if (Number.isInteger(v)) { return String(v); }
    return v.toFixed(Math.abs(v) < 1 ? 2 : 1);
  }

  function clock(ms, spanMs) {
    const d = new Date(ms);
    const p = (n) => String(n).padStart(2, "0");
    return spanMs > 3 * 3600e3 ? `${p(d.getHours())}:${p(d.getMinutes())}` : `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  // Relative x labels (e.g. minutes into a simulation) when opts.xFormat is given.
  function line(container, opts) {
    const series = opts.series || [];
    const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined && isFinite(p[1])));
    const legend = series.map((s) => `<span class="${esc(s.cls || "")}" style="color:${esc(s.color || "")}">${esc(s.name)}</span>`).join("");
    const points = all.length;
    let body;
    if (points === 0) {
      body = `<text class="empty" x="${W / 2}" y="${H / 2}" text-anchor="middle">${esc(opts.empty || "no data yet")}</text>`;
    } else {
      const xs = series.flatMap((s) => s.points.map((p) => p[0]));
      let xMin = opts.xMin !== undefined ? opts.xMin : Math.min(...xs);
      let xMax = opts.xMax !== undefined ? opts.xMax : Math.max(...xs);
      if (xMax <= xMin) { xMax = xMin + 1000; }
      const vs = all.map((p) => p[1]);
      let yMin = opts.yMin !== undefined ? opts.yMin : Math.min(...vs);
      let yMax = opts.yMax !== undefined ? opts.yMax : Math.max(...vs);
      if (opts.yMin === undefined) { yMin = Math.min(yMin, 0); }
      if (yMax <= yMin) { yMax = yMin + 1; }
      if (opts.yMax === undefined) { yMax = yMax + (yMax - yMin) * 0.08; }
      const x = (v) => L + ((v - xMin) / (xMax - xMin)) * (W - L - R);
      const y = (v) => T + (1 - (v - yMin) / (yMax - yMin)) * (H - T - B);
      const yt = niceTicks(yMin, yMax, 4);
      let grid = yt.map((v) => `<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v).toFixed(1)}" y2="${y(v).toFixed(1)}"/>` +
        `<text x="${L - 6}" y="${(y(v) + 3).toFixed(1)}" text-anchor="end">${esc(fmt(v))}${esc(opts.unit || "")}</text>`).join("");
      const xt = [0, 0.25, 0.5, 0.75, 1].map((f) => xMin + f * (xMax - xMin));
      grid += xt.map((v, i) => `<text x="${x(v).toFixed(1)}" y="${H - 6}" text-anchor="${i === 0 ? "start" : i === 4 ? "end" : "middle"}">` +
        `${esc(opts.xFormat ? opts.xFormat(v) : clock(v, xMax - xMin))}</text>`).join("");
      const paths = series.map((s) => {
        let d = "";
        let pen = false;
        let prev = null;
        for (const [t, v] of s.points) {
          if (v === null || v === undefined || !isFinite(v)) { pen = false; continue; }
          const px = x(t).toFixed(1), py = y(v).toFixed(1);
          if (!pen) { d += `M${px},${py}`; pen = true; }
          else if (s.step && prev !== null) { d += `H${px}V${py}`; }
          else { d += `L${px},${py}`; }
          prev = v;
        }
        const dots = s.points.length <= 40 && !s.step ? s.points.filter((p) => p[1] !== null && isFinite(p[1]))
          .map((p) => `<circle cx="${x(p[0]).toFixed(1)}" cy="${y(p[1]).toFixed(1)}" r="2.2" fill="${esc(s.color)}"/>`).join("") : "";
        return `<path d="${d}" fill="none" stroke="${esc(s.color)}" stroke-width="2" stroke-linejoin="round"/>${dots}`;
      }).join("");
      const markers = (opts.markers || []).map((m) => `<line x1="${x(m.at).toFixed(1)}" x2="${x(m.at).toFixed(1)}" y1="${T}" y2="${H - B}" ` +
        `stroke="${esc(m.color)}" stroke-dasharray="3,3"/>`).join("");
      body = grid + markers + paths;
    }
    container.innerHTML = `<div class="title">${esc(opts.title)}<span class="legend">${legend}</span></div>` +
      `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(opts.title)}" data-points="${points}">${body}</svg>`;
    container.dataset.points = String(points);
    return points;
  }

  return { line, esc };
})();
