// The explorable lens view: one plain-JS module, two hosts. In a notebook it is an anywidget ES module
// (`render({model, el})`, model = the widget's synced traits); in an exported HTML page the same `render` runs on
// a local stand-in model holding the embedded JSON (lens_plugins/plot/widget.py writes both). No library, no
// network: heatmap, top-k list and trajectory chart are drawn as plain DOM and SVG.
//
// Traits read: data (view_data(result)), selected [row, pos], pinned [token ids], theme "light" | "dark".

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const CHART = { width: 520, height: 240, left: 44, right: 12, top: 12, bottom: 56 };

function node(tag, attrs = {}, text = "") {
  const el = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text) el.textContent = text;
  return el;
}

// Screen coordinates of a trajectory: x by row index, y = probability on [0, 1]; null rows leave a gap.
function trajectoryPoints(probs) {
  const w = CHART.width - CHART.left - CHART.right, h = CHART.height - CHART.top - CHART.bottom;
  const step = probs.length > 1 ? w / (probs.length - 1) : 0;
  const segments = [[]];
  probs.forEach((p, r) => {
    if (p === null) { if (segments[segments.length - 1].length) segments.push([]); return; }
    segments[segments.length - 1].push([CHART.left + r * step, CHART.top + (1 - p) * h]);
  });
  return segments.filter((s) => s.length);
}

function render({ model, el }) {
  const root = node("div", { class: "lens-widget" });
  el.appendChild(root);

  const css = node("style", {}, `
    .lens-widget { font-family: sans-serif; font-size: 12px; color: var(--fg); background: var(--bg); padding: 8px; }
    .lens-widget.light { --fg: #222; --bg: #fff; --grid: #ddd; --sel: #000; }
    .lens-widget.dark { --fg: #eee; --bg: #1e1e1e; --grid: #444; --sel: #fff; }
    .lens-widget .bar button { margin-right: 6px; }
    .lens-widget .views { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
    .lens-widget table.heat { border-collapse: collapse; }
    .lens-widget td.cell { width: 54px; height: 16px; overflow: hidden; white-space: nowrap; font-size: 10px;
      cursor: pointer; border: 1px solid var(--grid); text-align: center; color: #000; }
    .lens-widget td.cell.selected { outline: 2px solid var(--sel); }
    .lens-widget tr.row-selected th { text-decoration: underline; }
    .lens-widget th { font-weight: normal; padding: 0 4px; white-space: nowrap; }
    .lens-widget ol.topk li { cursor: pointer; }
    .lens-widget ol.topk li.pinned { font-weight: bold; }
    .lens-widget svg text { fill: var(--fg); font-size: 10px; }
    .lens-widget svg line.axis { stroke: var(--fg); }
    .lens-widget svg line.marker { stroke: var(--grid); stroke-dasharray: 3 3; }
  `);
  root.appendChild(css);
  const bar = node("div", { class: "bar" });
  const themeButton = node("button", { class: "theme" }, "light / dark");
  const saveButton = node("button", { class: "save" }, "save view JSON");
  const title = node("span", { class: "title" });
  bar.append(themeButton, saveButton, title);
  const views = node("div", { class: "views" });
  const heat = node("table", { class: "heat" });
  const side = node("div", { class: "side" });
  const topHeading = node("div", { class: "top-heading" });
  const topList = node("ol", { class: "topk" });
  const chart = node("svg:svg", { class: "trajectories", width: CHART.width, height: CHART.height });
  const legend = node("div", { class: "legend" });
  side.append(topHeading, topList, chart, legend);
  views.append(heat, side);
  root.append(bar, views);

  const data = () => model.get("data");
  const selected = () => model.get("selected");
  const pins = () => {  // the position's default pins (tokens worth tracking), then the reader's own
    const [, p] = selected();
    const own = model.get("pinned");
    return [...new Set([...(data().pins[p] || []), ...own])];
  };

  function colour(p) {  // P(top-1) on a white-to-blue scale
    const t = Math.max(0, Math.min(1, p));
    const r = Math.round(255 - 200 * t), g = Math.round(255 - 120 * t);
    return `rgb(${r},${g},255)`;
  }

  function drawHeat() {
    const d = data(), [sr, sp] = selected();
    heat.replaceChildren();
    const head = node("tr");
    head.appendChild(node("th"));
    d.tokens.forEach((t, p) => head.appendChild(node("th", { class: "pos" }, `${d.positions[p]}: ${t}`)));
    heat.appendChild(head);
    for (let r = d.labels.length - 1; r >= 0; r--) {  // the output row on top, as the lens heatmaps
      const tr = node("tr", { class: r === sr ? "row-selected" : "" });
      tr.appendChild(node("th", {}, d.labels[r]));
      d.tokens.forEach((_, p) => {
        const [id, prob] = d.top[r][p][0];
        const td = node("td", { class: "cell" + (r === sr && p === sp ? " selected" : ""), "data-row": r,
                                "data-pos": p, title: `${d.labels[r]}, pos ${d.positions[p]}: ${d.shown[id]} ${prob.toFixed(3)}`,
                                style: `background:${colour(prob)}` }, d.shown[id]);
        td.addEventListener("click", () => { model.set("selected", [r, p]); model.save_changes(); });
        tr.appendChild(td);
      });
      heat.appendChild(tr);
    }
  }

  function drawTop() {
    const d = data(), [r, p] = selected(), pinned = new Set(pins());
    topHeading.textContent = `top-${d.top[r][p].length} at ${d.labels[r]}, position ${d.positions[p]} (click a token to pin it)`;
    topList.replaceChildren();
    d.top[r][p].forEach(([id, prob]) => {
      const li = node("li", { class: pinned.has(id) ? "pinned" : "", "data-id": id });
      li.append(node("span", { class: "tok" }, d.shown[id]), " ", node("span", { class: "prob" }, prob.toFixed(3)));
      li.addEventListener("click", () => {
        const own = model.get("pinned");
        model.set("pinned", own.includes(id) ? own.filter((x) => x !== id) : [...own, id]);
        model.save_changes();
      });
      topList.appendChild(li);
    });
  }

  function drawChart() {
    const d = data(), [sr, p] = selected();
    chart.replaceChildren();
    const x0 = CHART.left, x1 = CHART.width - CHART.right, y0 = CHART.top, y1 = CHART.height - CHART.bottom;
    chart.append(node("svg:line", { class: "axis", x1: x0, y1: y1, x2: x1, y2: y1 }),
                 node("svg:line", { class: "axis", x1: x0, y1: y0, x2: x0, y2: y1 }),
                 node("svg:text", { x: 4, y: y0 + 8 }, "1"), node("svg:text", { x: 4, y: y1 }, "0"),
                 node("svg:text", { x: x0, y: CHART.height - 4 }, `P(token) at position ${d.positions[p]}, by row`));
    const step = d.labels.length > 1 ? (x1 - x0) / (d.labels.length - 1) : 0;
    chart.appendChild(node("svg:line", { class: "marker", x1: x0 + sr * step, y1: y0, x2: x0 + sr * step, y2: y1 }));
    legend.replaceChildren();
    pins().forEach((id, i) => {
      const track = d.tracks[p][id];
      const name = d.shown[id];
      if (!track) { legend.appendChild(node("div", { class: "missing", "data-id": id }, `${name}: no trajectory at this position`)); return; }
      const stroke = COLOURS[i % COLOURS.length];
      const group = node("svg:g", { class: "trajectory", "data-id": id });
      trajectoryPoints(track.probs).forEach((segment) => {
        group.appendChild(node("svg:polyline", { points: segment.map(([x, y]) => `${x.toFixed(2)},${y.toFixed(2)}`).join(" "),
                                                 fill: "none", stroke, "stroke-width": 2 }));
      });
      chart.appendChild(group);
      legend.appendChild(node("div", { style: `color:${stroke}`, "data-id": id },
                              `${name}${track.reason ? " (" + track.reason + ")" : ""}${track.partial ? " (where in the top-k)" : ""}`));
    });
  }

  function drawAll() {
    root.className = "lens-widget " + (model.get("theme") === "dark" ? "dark" : "light");
    title.textContent = data().title || "";
    drawHeat(); drawTop(); drawChart();
  }

  themeButton.addEventListener("click", () => {
    model.set("theme", model.get("theme") === "dark" ? "light" : "dark");
    model.save_changes();
  });
  saveButton.addEventListener("click", () => {
    const d = data(), [r, p] = selected();
    const view = { selected: { row: d.labels[r], position: d.positions[p] }, theme: model.get("theme"),
                   top: d.top[r][p].map(([id, prob]) => ({ token: d.vocab[id], id, prob })),
                   trajectories: pins().filter((id) => d.tracks[p][id]).map((id) => ({ token: d.vocab[id], id, ...d.tracks[p][id] })),
                   labels: d.labels };
    const link = node("a", { href: URL.createObjectURL(new Blob([JSON.stringify(view, null, 1)], { type: "application/json" })),
                             download: "lens_view.json" });
    link.click();
  });
  for (const name of ["data", "selected", "pinned", "theme"]) model.on(`change:${name}`, drawAll);
  drawAll();
}

// A stand-in for an anywidget model in a static page: the same get / set / on / save_changes.
function localModel(state) {
  const listeners = {};
  return {
    get: (name) => state[name],
    set: (name, value) => { state[name] = value; (listeners["change:" + name] || []).forEach((f) => f()); },
    on: (event, f) => { (listeners[event] = listeners[event] || []).push(f); },
    save_changes: () => {},
  };
}

export default { render, localModel };
