// meshctl observe ui: the live map and the flow table.
//
// Every value shown comes from a flow, and flows name pods that may be hostile, so text only
// ever enters the page through textContent, and the map's SVG is parsed as XML (no script
// runs there) and copied element by element through an allow-list before it is shown.
"use strict";

(() => {
  const MAX_ROWS = 2000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const SVG_ELEMENTS = new Set([
    "svg", "g", "title", "text", "tspan", "polygon", "polyline", "path", "ellipse", "circle",
    "rect", "line",
  ]);
  const SVG_ATTRIBUTES = new Set([
    "id", "class", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry", "width",
    "height", "viewBox", "transform", "points", "d", "fill", "fill-opacity", "stroke",
    "stroke-width", "stroke-dasharray", "stroke-opacity", "font-family", "font-size",
    "font-weight", "font-style", "text-anchor", "preserveAspectRatio",
  ]);

  const tbody = document.getElementById("flows");
  const filter = document.getElementById("filter");
  const shown = document.getElementById("shown");
  const status = document.getElementById("status");
  const counts = document.getElementById("counts");
  const mapBox = document.getElementById("map");
  const mapError = document.getElementById("map-error");
  let rows = []; // {tr, fields, text}, oldest first
  let terms = [];

  const str = (v) => (typeof v === "string" ? v : v === null || v === undefined ? "" : String(v));
  const part = (f, key) => (f && typeof f[key] === "object" && f[key] !== null ? f[key] : {});

  function who(p) {
    const ns = str(p.namespace);
    const pod = str(p.pod);
    if (pod) return (ns ? ns + "/" : "") + pod;
    const ip = str(p.ip);
    return ip ? ip + (p.port !== null && p.port !== undefined ? ":" + str(p.port) : "") : "?";
  }

  function describe(f) {
    const src = part(f, "source");
    const dst = part(f, "destination");
    const l7 = part(f, "l7");
    let request = "";
    if (l7.method || l7.path) {
      request = (str(l7.method) + " " + str(l7.authority) + str(l7.path)).trim();
      if (l7.status !== null && l7.status !== undefined) request += " => " + str(l7.status);
      if (l7.grpc_status !== null && l7.grpc_status !== undefined) {
        request += " grpc " + str(l7.grpc_status);
      }
    }
    const verdict = str(f.verdict);
    let why = "";
    if (verdict === "DENIED") why = f.policy ? " by " + str(f.policy) : "";
    if (verdict === "DROPPED") why = f.reason ? " (" + str(f.reason) + ")" : "";
    const latency = typeof f.latency_ms === "number" ? f.latency_ms.toFixed(1) + " ms" : "";
    let destination = who(dst);
    if (dst.service) destination = str(dst.service) + " → " + destination;
    const time = str(f.time).replace("T", " ").replace("Z", "");
    return {
      cells: [
        [time, ""],
        [who(src), ""],
        [destination, ""],
        [str(f.protocol), ""],
        [request, ""],
        [verdict + why, "v-" + (/^[A-Z]+$/.test(verdict) ? verdict : "OTHER")],
        [f.mtls === true ? "mTLS" : "plaintext", f.mtls === true ? "" : "plain"],
        [latency, ""],
        [str(f.proxy || f.reporter), ""],
      ],
      fields: {
        ns: [str(src.namespace), str(dst.namespace)],
        pod: [str(src.pod), str(dst.pod)],
        from: [who(src)],
        to: [who(dst), str(dst.service)],
        service: [str(dst.service)],
        verdict: [verdict],
        proto: [str(f.protocol)],
        status: [str(l7.status)],
        identity: [str(src.identity), str(dst.identity)],
        node: [str(f.node)],
      },
    };
  }

  const ALIASES = { namespace: "ns", protocol: "proto", "from-pod": "from", "to-pod": "to",
                    "to-service": "service", id: "identity" };

  function parseFilter(text) {
    return text.toLowerCase().split(/\s+/).filter((t) => t).map((t) => {
      const m = /^([a-z-]+)[:=](.*)$/.exec(t);
      if (m) {
        const key = ALIASES[m[1]] || m[1];
        return { key, value: m[2] };
      }
      return { key: null, value: t };
    });
  }

  function matches(row) {
    return terms.every(({ key, value }) => {
      if (key && row.fields[key]) {
        return row.fields[key].some((v) => v.toLowerCase().includes(value));
      }
      return row.text.includes(key ? key + ":" + value : value);
    });
  }

  function updateShown() {
    const visible = rows.reduce((n, r) => n + (r.tr.hidden ? 0 : 1), 0);
    shown.textContent = terms.length
      ? "showing " + visible + " of " + rows.length + " flows"
      : rows.length + " flows";
    const by = {};
    for (const r of rows) by[r.verdict] = (by[r.verdict] || 0) + 1;
    counts.textContent = Object.keys(by).sort().map((k) => k + " " + by[k]).join(" · ");
  }

  function addFlow(f, update = true) {
    if (!f || typeof f !== "object") return;
    const d = describe(f);
    const tr = document.createElement("tr");
    for (const [text, cls] of d.cells) {
      const td = document.createElement("td");
      td.textContent = text;
      td.title = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    tr.dataset.verdict = str(f.verdict);
    const row = { tr, fields: d.fields, verdict: str(f.verdict),
                  text: d.cells.map((c) => c[0]).join(" ").toLowerCase() };
    row.tr.hidden = !matches(row);
    rows.push(row);
    tbody.insertBefore(tr, tbody.firstChild); // newest on top
    while (rows.length > MAX_ROWS) rows.shift().tr.remove();
    if (update) updateShown();
  }

  function applyFilter() {
    terms = parseFilter(filter.value);
    for (const r of rows) r.tr.hidden = !matches(r);
    updateShown();
  }

  // A copy of graphviz's SVG holding only drawing elements and attributes: no script, no
  // links, no event handlers, no styles, whatever the SVG text contained.
  function cleanSvg(node) {
    if (node.nodeType === Node.TEXT_NODE) return document.createTextNode(node.nodeValue);
    if (node.nodeType !== Node.ELEMENT_NODE || node.namespaceURI !== SVG_NS) return null;
    if (!SVG_ELEMENTS.has(node.localName)) return null;
    const out = document.createElementNS(SVG_NS, node.localName);
    for (const attr of node.attributes) {
      if (attr.namespaceURI === null && SVG_ATTRIBUTES.has(attr.name)) {
        out.setAttribute(attr.name, attr.value);
      }
    }
    for (const child of node.childNodes) {
      const copy = cleanSvg(child);
      if (copy) out.appendChild(copy);
    }
    return out;
  }

  function showMap(svgText) {
    const doc = new DOMParser().parseFromString(str(svgText), "image/svg+xml");
    const root = doc.documentElement;
    if (!root || root.localName !== "svg" || doc.getElementsByTagName("parsererror").length) {
      showMapError("the map could not be read");
      return;
    }
    mapBox.replaceChildren(cleanSvg(root)); // drawn at graphviz's size, shrunk to fit if wider
    mapError.hidden = true;
  }

  function showMapError(message) {
    mapError.textContent = "map: " + str(message);
    mapError.hidden = false;
  }

  function setStatus(text, cls) {
    status.textContent = text;
    status.className = "status " + cls;
  }

  filter.addEventListener("input", applyFilter);

  const events = new EventSource("/events");
  events.addEventListener("flows", (e) => {
    for (const r of rows) r.tr.remove();
    rows = [];
    const list = JSON.parse(e.data);
    if (Array.isArray(list)) list.forEach((f) => addFlow(f, false));
    updateShown();
  });
  events.addEventListener("flow", (e) => addFlow(JSON.parse(e.data)));
  events.addEventListener("map", (e) => showMap(JSON.parse(e.data)));
  events.addEventListener("maperror", (e) => showMapError(JSON.parse(e.data)));
  events.addEventListener("source", (e) => {
    const state = str(JSON.parse(e.data));
    setStatus("flows: " + state, state === "live" ? "live" : "down");
  });
  events.addEventListener("error", () => setStatus("disconnected, retrying…", "down"));
})();
