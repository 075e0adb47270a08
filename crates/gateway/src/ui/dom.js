// DOM helpers. Every string becomes a text node or a property: nothing here parses HTML, so data from the
// server (payloads, errors, kinds) is always inert text.

const SVG = "http://www.w3.org/2000/svg";

/** h("tag#id.class", {props, on: {event: fn}, dataset: {...}}, ...children) */
export function h(spec, props = {}, ...children) {
  const tag = spec.match(/^[a-z0-9]*/)[0] || "div";
  const el = document.createElement(tag);
  const classes = [];
  for (const [, sigil, name] of spec.slice(tag.length).matchAll(/([#.])([^#.]+)/g)) {
    if (sigil === "#") el.id = name;
    else classes.push(name);
  }
  if (classes.length) el.className = classes.join(" ");
  apply(el, props);
  append(el, ...children);
  return el;
}

function apply(el, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null) continue;
    if (k === "on") for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "href") el.setAttribute("href", safeHref(v));
    else if (k === "class") el.className = v;
    else if (k in el) el[k] = v;
    else el.setAttribute(k, String(v));
  }
}

/** Only the dashboard's own routes are links. */
function safeHref(v) {
  const s = String(v);
  return s.startsWith("#/") ? s : "#/";
}

export function append(el, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function text(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "string") return v;
  return JSON.stringify(v, null, 2);
}

export function time(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

export function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 3600000) return `${(ms / 60000).toFixed(1)} min`;
  return `${(ms / 3600000).toFixed(1)} h`;
}

/** A small SVG line of `values` (numbers), scaled to its own maximum. */
export function sparkline(values, { width = 120, height = 24, label = "" } = {}) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "spark");
  const title = document.createElementNS(SVG, "title");
  title.textContent = label;
  svg.append(title);
  if (values.length > 1) {
    const max = Math.max(1e-9, ...values);
    const step = width / (values.length - 1);
    const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 1 - (v / max) * (height - 2)).toFixed(1)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", pts.join(" "));
    svg.append(line);
  }
  return svg;
}

/** A table with clickable, sortable headers. cols: [{key, label, value(row), render(row)?, num?}] */
export function sortableTable(cols, rows, state, onSort) {
  const sorted = [...rows];
  const col = cols.find((c) => c.key === state.key);
  if (col) {
    sorted.sort((a, b) => {
      const x = col.value(a), y = col.value(b);
      const r = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return state.dir === "desc" ? -r : r;
    });
  }
  const head = h("tr", {}, cols.map((c) =>
    h("th", {
      class: c.sortable === false ? "" : "sortable" + (c.key === state.key ? ` sorted-${state.dir}` : ""),
      dataset: { key: c.key },
      on: c.sortable === false ? {} : {
        click: () => onSort(c.key === state.key
          ? { key: c.key, dir: state.dir === "asc" ? "desc" : "asc" }
          : { key: c.key, dir: c.num ? "desc" : "asc" }),
      },
    }, c.label)));
  const body = sorted.map((r) =>
    h("tr", {}, cols.map((c) => h(c.num ? "td.num" : "td", {}, c.render ? c.render(r) : text(c.value(r))))));
  return h("table", {}, h("thead", {}, head), h("tbody", {}, body));
}
