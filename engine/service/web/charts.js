// Small SVG charts for the page (no library, nothing fetched): a line chart, a bar chart
// and a scatter plot. Each returns an <svg class="plot"> element.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
                 "#e6550d", "#31a354", "#756bb1", "#636363"];

function svgElement(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes || {})) element.setAttribute(key, value);
  if (parent) parent.appendChild(element);
  return element;
}

function svgText(parent, x, y, text, attributes) {
  const element = svgElement("text", { x, y, ...(attributes || {}) }, parent);
  element.textContent = text;
  return element;
}

// A linear scale from [lo, hi] to [a, b]; a flat range is widened so that it still draws.
function scale(lo, hi, a, b) {
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  return (v) => a + (v - lo) / (hi - lo) * (b - a);
}

function format(v) {
  if (Number.isInteger(v)) return String(v);
  const magnitude = Math.abs(v);
  return magnitude >= 1000 || (magnitude > 0 && magnitude < 0.01) ? v.toExponential(1) : v.toFixed(magnitude >= 10 ? 1 : 3);
}

function frame(title, width, height) {
  const svg = svgElement("svg", { class: "plot", width, height, viewBox: `0 0 ${width} ${height}` });
  svgText(svg, width / 2, 14, title, { class: "title", "text-anchor": "middle" });
  return svg;
}

function axes(svg, box, xLo, xHi, yLo, yHi, xLabel) {
  svgElement("line", { x1: box.left, y1: box.bottom, x2: box.right, y2: box.bottom, stroke: "#999" }, svg);
  svgElement("line", { x1: box.left, y1: box.top, x2: box.left, y2: box.bottom, stroke: "#999" }, svg);
  svgText(svg, box.left - 4, box.top + 4, format(yHi), { "text-anchor": "end" });
  svgText(svg, box.left - 4, box.bottom, format(yLo), { "text-anchor": "end" });
  if (xLo === null) return;  // a bar chart: its bars are labelled instead
  svgText(svg, box.left, box.bottom + 14, format(xLo), { "text-anchor": "middle" });
  svgText(svg, box.right, box.bottom + 14, format(xHi), { "text-anchor": "middle" });
  if (xLabel) svgText(svg, (box.left + box.right) / 2, box.bottom + 16, xLabel, { "text-anchor": "middle" });
}

// series: [{name, points: [[x, y], ...]}], drawn on one pair of axes.
function lineChart(title, series, xLabel, width = 320, height = 200) {
  const svg = frame(title, width, height);
  const box = { left: 52, right: width - 10, top: 24, bottom: height - 40 };
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  if (!all.length) return svg;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [xLo, xHi, yLo, yHi] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = scale(xLo, xHi, box.left, box.right), sy = scale(yLo, yHi, box.bottom, box.top);
  axes(svg, box, xLo, xHi, yLo, yHi, xLabel);
  series.forEach((s, n) => {
    const points = s.points.filter((p) => Number.isFinite(p[1]));
    const colour = PALETTE[n % PALETTE.length];
    svgElement("polyline", {
      class: "series", fill: "none", stroke: colour, "stroke-width": 2,
      points: points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
    }, svg);
    if (series.length > 1) svgText(svg, box.left + 6 + 110 * n, height - 6, s.name, { fill: colour });
  });
  return svg;
}

// bars: [{label, value}], values in [0, max].
function barChart(title, bars, width = 360, height = 200) {
  const svg = frame(title, width, height);
  const box = { left: 52, right: width - 10, top: 24, bottom: height - 44 };
  const max = Math.max(...bars.map((b) => b.value), 1e-9);
  const sy = scale(0, max, box.bottom, box.top);
  axes(svg, box, null, null, 0, max, "");
  const step = (box.right - box.left) / Math.max(bars.length, 1);
  bars.forEach((b, n) => {
    const x = box.left + n * step + step * 0.15, y = sy(b.value);
    const rect = svgElement("rect", {
      class: "bar", x, y, width: step * 0.7, height: box.bottom - y, fill: PALETTE[n % PALETTE.length],
    }, svg);
    svgElement("title", {}, rect).textContent = `${b.label}: ${format(b.value)}`;
    svgText(svg, x + step * 0.35, box.bottom + 12, b.label.slice(0, 10), { "text-anchor": "middle" });
    svgText(svg, x + step * 0.35, y - 3, format(b.value), { "text-anchor": "middle" });
  });
  return svg;
}

// points: [{x, y, label, title}]; one colour per label, the most frequent labels first.
function scatterPlot(title, points, width = 560, height = 420) {
  const wrapper = document.createElement("div");
  wrapper.className = "plots";
  const svg = frame(title, width, height);
  const box = { left: 10, right: width - 10, top: 24, bottom: height - 10 };
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const sx = scale(Math.min(...xs), Math.max(...xs), box.left, box.right);
  const sy = scale(Math.min(...ys), Math.max(...ys), box.bottom, box.top);
  const counts = new Map();
  points.forEach((p) => counts.set(p.label, (counts.get(p.label) || 0) + 1));
  const order = [...counts.entries()].sort((a, b) => b[1] - a[1]).map((e) => e[0]);
  const colour = new Map(order.map((label, n) => [label, label === "" ? "#bbb" : PALETTE[n % PALETTE.length]]));
  for (const p of points) {
    const dot = svgElement("circle", {
      class: "point", cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: 2.5, fill: colour.get(p.label), "fill-opacity": 0.75,
    }, svg);
    svgElement("title", {}, dot).textContent = p.label ? `${p.title} (${p.label})` : p.title;
  }
  wrapper.appendChild(svg);
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const label of order) {
    const row = document.createElement("div");
    row.innerHTML = `<span style="background:${colour.get(label)}"></span>`;
    row.appendChild(document.createTextNode(`${label || "(none)"} — ${counts.get(label)}`));
    legend.appendChild(row);
  }
  wrapper.appendChild(legend);
  return wrapper;
}
