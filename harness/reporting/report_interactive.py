"""The report's in-page interaction: a sortable, filterable leaderboard and a Pareto explorer.

Everything is inline (one JSON data block and one script in the page, no network, no library):
the HTML report stays a single offline file. The static table stays as it is, so the page
reads the same with JavaScript off; the script only adds controls and reorders or hides rows.

- Sorting: a click on a leaderboard header sorts by that column (ascending, again:
  descending). The sort keys are the raw leaderboard values embedded as JSON (not the
  formatted cell text), so "1,234" and "n/a" sort as the number and as missing; missing
  values go last in both directions; strings compare numeric-aware ("r8" < "r16").
- Filtering: method and task checkboxes hide the rows not selected.
- Pareto explorer: two <select>s pick any two numeric leaderboard columns and a direction
  for each ("lower is better" / "higher is better"); an inline SVG plots the rows the
  filters leave, and the Pareto front is recomputed per task for those axes: a row is on the
  front when no row of its task is at least as good on both axes and strictly better on one.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import pandas as pd

# Ids the page and its tests share.
TABLE_WRAP_ID = "leaderboard-table"
EXPLORER_ID = "pareto-explorer"
DATA_ID = "report-data"

# Columns where a smaller value is the better one (costs, failures, spread); the reader can
# flip either axis in the page.
LOWER_IS_BETTER_RE = re.compile(
    r"(time|memory|_mb$|params|failed|diverged|_std$|loss|rank|p_?value|duplicate)",
    re.IGNORECASE,
)
DEFAULT_X = "trainable_params"
DEFAULT_Y = "test_mean"


def json_for_script(obj: Any) -> str:
    """JSON safe to embed in an HTML <script> block: no "</script>", "<!--" or "&" escapes
    to break out of it (every <, >, & is written as a \\u escape, which JSON reads back)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _plain(v: Any) -> Any:
    """A JSON value for one cell: finite numbers as numbers, missing as null, else a string."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, bool | np.bool_):
        return int(bool(v))
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(float(v)) else None
    text = str(v)
    return text if text.strip() else None


def numeric_columns(board: pd.DataFrame) -> list[str]:
    """Leaderboard columns the explorer offers as axes: numeric (not boolean), with at least
    one finite value."""
    cols = []
    for col in board.columns:
        s = board[col]
        if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            continue
        if np.isfinite(pd.to_numeric(s, errors="coerce").to_numpy(float)).any():
            cols.append(str(col))
    return cols


def explorer_payload(
    board: pd.DataFrame, headers: list[str], sort_keys: list[list[Any]], colors: dict[str, str]
) -> dict[str, Any]:
    """The JSON the page's script reads. `sort_keys[i][j]` is the raw value behind cell j of
    leaderboard row i (rows in the table's order, which is `board`'s); `colors` maps each
    method to a CSS colour (the static figures' colours)."""
    if len(sort_keys) != len(board) or any(len(k) != len(headers) for k in sort_keys):
        raise ValueError("leaderboard sort keys do not line up with its rows and headers")
    cols = numeric_columns(board)
    x = DEFAULT_X if DEFAULT_X in cols else (cols[0] if cols else None)
    y = DEFAULT_Y if DEFAULT_Y in cols and DEFAULT_Y != x else next((c for c in cols if c != x), x)
    return {
        "headers": headers,
        "keys": [[_plain(v) for v in row] for row in sort_keys],
        "task": [str(t) for t in board["task"]],
        "method": [str(m) for m in board["method"]],
        "colors": colors,
        "columns": [{"name": c, "lower_better": bool(LOWER_IS_BETTER_RE.search(c))} for c in cols],
        "values": {c: [_plain(v) for v in board[c]] for c in cols},
        "x": x,
        "y": y,
    }


def explorer_html(payload: dict[str, Any]) -> str:
    """The explorer's (hidden until the script runs) container, the data and the script."""
    return (
        f'<div id="{EXPLORER_ID}" class="explorer" hidden></div>\n'
        f'<script type="application/json" id="{DATA_ID}">{json_for_script(payload)}</script>\n'
        f"<script>{REPORT_JS}</script>"
    )


CSS = """
.controls{display:flex;flex-wrap:wrap;gap:.6em 1.2em;align-items:flex-start;margin:.4em 0;
font-size:.85em}
.controls fieldset{border:1px solid #ccd;padding:.2em .6em .4em;margin:0}
.controls label{margin-right:.7em;white-space:nowrap}
.controls button{font-size:.9em;margin-right:.4em}
th.sortable{cursor:pointer;user-select:none}th.sortable:hover{background:#dde2f0}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:.8em}
th[aria-sort=descending]::after{content:" \\25BC";font-size:.8em}
.explorer svg{border:1px solid #dde;background:#fff;max-width:100%;height:auto}
.explorer .note{font-size:.85em;color:#444;max-width:70em}
"""

# Plain ES2017, no modules, no network: the page must work opened from disk.
REPORT_JS = r"""
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var wrap = document.getElementById("leaderboard-table");
  var table = wrap && wrap.querySelector("table");
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  rows.forEach(function (tr, i) { tr.dataset.row = String(i); });
  var n = rows.length;

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function missing(v) {
    return v === null || v === undefined || v === "" || (typeof v === "number" && !isFinite(v));
  }
  function uniq(list) {
    var seen = {}, out = [];
    list.forEach(function (v) { if (!seen[v]) { seen[v] = true; out.push(v); } });
    return out;
  }

  // -- sorting: by the raw values, missing last in either direction, ties in table order --
  var sortCol = -1, sortDir = 1;
  function compareKeys(a, b) {
    if (typeof a === "number" && typeof b === "number") { return a - b; }
    if (typeof a === "number") { return -1; }
    if (typeof b === "number") { return 1; }
    return String(a).localeCompare(String(b), undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(col) {
    sortDir = col === sortCol ? -sortDir : 1;
    sortCol = col;
    var order = rows.slice().sort(function (ra, rb) {
      var i = +ra.dataset.row, j = +rb.dataset.row;
      var a = data.keys[i][col], b = data.keys[j][col];
      var ma = missing(a), mb = missing(b);
      if (ma || mb) { return ma === mb ? i - j : (ma ? 1 : -1); }
      return sortDir * compareKeys(a, b) || i - j;
    });
    order.forEach(function (tr) { tbody.appendChild(tr); });
    headers.forEach(function (th, k) {
      if (k === col) { th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending"); }
      else { th.removeAttribute("aria-sort"); }
    });
  }
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  headers.forEach(function (th, k) {
    th.classList.add("sortable");
    th.tabIndex = 0;
    th.title = "click to sort (again: reverse); missing values stay last";
    th.addEventListener("click", function () { sortBy(k); });
    th.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sortBy(k); }
    });
  });

  // -- filters: method and task checkboxes --
  var controls = el("div", {"class": "controls", id: "leaderboard-filters"});
  var count = el("span", {"class": "count"});
  function checkboxGroup(name, values) {
    var box = el("fieldset", {"data-filter": name});
    box.appendChild(el("legend", {}, name));
    [["all", true], ["none", false]].forEach(function (pair) {
      var b = el("button", {type: "button", "data-set": pair[0]}, pair[0]);
      b.addEventListener("click", function () {
        box.querySelectorAll("input").forEach(function (c) { c.checked = pair[1]; });
        update();
      });
      box.appendChild(b);
    });
    values.slice().sort(function (a, b) { return compareKeys(a, b); }).forEach(function (v) {
      var label = el("label");
      var c = el("input", {type: "checkbox", value: v});
      c.checked = true;
      c.addEventListener("change", update);
      label.appendChild(c);
      label.appendChild(document.createTextNode(" " + v));
      box.appendChild(label);
    });
    controls.appendChild(box);
    return box;
  }
  var methodBox = checkboxGroup("method", uniq(data.method));
  var taskBox = checkboxGroup("task", uniq(data.task));
  controls.appendChild(count);
  wrap.insertBefore(controls, table);
  function chosen(box) {
    var set = {};
    box.querySelectorAll("input:checked").forEach(function (c) { set[c.value] = true; });
    return set;
  }
  function visibleRows() {
    var m = chosen(methodBox), t = chosen(taskBox), out = [];
    for (var i = 0; i < n; i++) { if (m[data.method[i]] && t[data.task[i]]) { out.push(i); } }
    return out;
  }

  // -- the Pareto explorer --
  var box = document.getElementById("pareto-explorer");
  var pickX, pickY, dirX, dirY, plot, note;
  function columnSelect(id, value) {
    var s = el("select", {id: id});
    data.columns.forEach(function (c) {
      var o = el("option", {value: c.name}, c.name);
      if (c.name === value) { o.selected = true; }
      s.appendChild(o);
    });
    return s;
  }
  function dirSelect(id, column) {
    var s = el("select", {id: id});
    s.appendChild(el("option", {value: "lower"}, "lower is better"));
    s.appendChild(el("option", {value: "higher"}, "higher is better"));
    s.value = lowerBetter(column) ? "lower" : "higher";
    return s;
  }
  function lowerBetter(name) {
    for (var k = 0; k < data.columns.length; k++) {
      if (data.columns[k].name === name) { return data.columns[k].lower_better; }
    }
    return false;
  }
  if (box && data.columns.length) {
    box.hidden = false;
    box.appendChild(el("h3", {}, "Pareto explorer"));
    box.appendChild(el("p", {"class": "note"},
      "Any two numeric leaderboard columns against each other, for the rows the filters " +
      "above leave. Black-edged points are Pareto-optimal among the rows of their task: no " +
      "other row of that task is at least as good on both axes and strictly better on one " +
      "(the direction of each axis is yours to set). Dashed: the front of each task."));
    var form = el("div", {"class": "controls"});
    pickX = columnSelect("pareto-x", data.x); dirX = dirSelect("pareto-x-dir", data.x);
    pickY = columnSelect("pareto-y", data.y); dirY = dirSelect("pareto-y-dir", data.y);
    [["x axis ", pickX, dirX], ["y axis ", pickY, dirY]].forEach(function (t) {
      var label = el("label", {}, t[0]);
      label.appendChild(t[1]); label.appendChild(document.createTextNode(" "));
      label.appendChild(t[2]);
      form.appendChild(label);
    });
    pickX.addEventListener("change", function () {
      dirX.value = lowerBetter(pickX.value) ? "lower" : "higher"; draw();
    });
    pickY.addEventListener("change", function () {
      dirY.value = lowerBetter(pickY.value) ? "lower" : "higher"; draw();
    });
    dirX.addEventListener("change", draw); dirY.addEventListener("change", draw);
    box.appendChild(form);
    plot = el("div", {"class": "plot"});
    box.appendChild(plot);
    note = el("p", {"class": "note", id: "pareto-front"});
    box.appendChild(note);
  }

  // Indices (into `idx`) on the front: no other point of the same task dominates them.
  function front(idx, xs, ys, sx, sy) {
    return idx.map(function (i, a) {
      for (var b = 0; b < idx.length; b++) {
        var j = idx[b];
        if (b === a || data.task[j] !== data.task[i]) { continue; }
        var gx = sx * (xs[b] - xs[a]), gy = sy * (ys[b] - ys[a]);  // >= 0: j at least as good
        if (gx >= 0 && gy >= 0 && (gx > 0 || gy > 0)) { return false; }
      }
      return true;
    });
  }
  function ticks(lo, hi, log) {
    if (log) {
      var out = [];
      for (var e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
        var v = Math.pow(10, e);
        if (v >= lo * 0.999 && v <= hi * 1.001) { out.push(v); }
      }
      return out.length >= 2 ? out : [lo, hi];
    }
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / 5 || 1)));
    [1, 2, 5, 10].some(function (m) {
      if ((hi - lo) / (step * m) <= 6) { step *= m; return true; }
      return false;
    });
    var res = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) { res.push(t); }
    return res;
  }
  function fmt(v) {
    if (v === 0) { return "0"; }
    var a = Math.abs(v);
    if (a >= 1e6 || a < 1e-3) { return v.toExponential(1); }
    if (a >= 1000) { return Math.round(v).toLocaleString("en-US"); }
    return String(+v.toPrecision(3));
  }
  var SHAPES = ["circle", "square", "triangle", "diamond", "cross"];
  function marker(shape, x, y, r) {
    if (shape === "circle") { return svg("circle", {cx: x, cy: y, r: r}); }
    var d = {
      square: [[-1, -1], [1, -1], [1, 1], [-1, 1]],
      triangle: [[0, -1.25], [1.15, 0.85], [-1.15, 0.85]],
      diamond: [[0, -1.3], [1.3, 0], [0, 1.3], [-1.3, 0]],
      cross: [[-1, -0.35], [-0.35, -0.35], [-0.35, -1], [0.35, -1], [0.35, -0.35], [1, -0.35],
              [1, 0.35], [0.35, 0.35], [0.35, 1], [-0.35, 1], [-0.35, 0.35], [-1, 0.35]]
    }[shape];
    return svg("polygon", {points: d.map(function (p) {
      return (x + p[0] * r).toFixed(1) + "," + (y + p[1] * r).toFixed(1);
    }).join(" ")});
  }

  function draw() {
    if (!plot) { return; }
    var cx = pickX.value, cy = pickY.value;
    var sx = dirX.value === "lower" ? -1 : 1, sy = dirY.value === "lower" ? -1 : 1;
    var shown = visibleRows(), idx = [], xs = [], ys = [];
    shown.forEach(function (i) {
      var x = data.values[cx][i], y = data.values[cy][i];
      if (!missing(x) && !missing(y)) { idx.push(i); xs.push(x); ys.push(y); }
    });
    var W = 820, H = 440, L = 78, R = 190, T = 20, B = 52;
    var s = svg("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H,
                        role: "img", "aria-label": cy + " vs " + cx});
    s.appendChild(svg("text", {"class": "xlabel", x: L + (W - L - R) / 2, y: H - 10,
      "text-anchor": "middle", "font-size": 13},
      cx + " (" + (sx < 0 ? "lower" : "higher") + " is better)"));
    s.appendChild(svg("text", {"class": "ylabel", x: 16, y: T + (H - T - B) / 2,
      "text-anchor": "middle", "font-size": 13,
      transform: "rotate(-90 16 " + (T + (H - T - B) / 2) + ")"},
      cy + " (" + (sy < 0 ? "lower" : "higher") + " is better)"));
    var onFront = front(idx, xs, ys, sx, sy);
    var tasks = uniq(data.task), methods = uniq(data.method).sort(compareKeys);
    if (idx.length) {
      var lo = function (a) { return Math.min.apply(null, a); };
      var hi = function (a) { return Math.max.apply(null, a); };
      var x0 = lo(xs), x1 = hi(xs), y0 = lo(ys), y1 = hi(ys);
      var logX = x0 > 0 && x1 / x0 > 50, logY = y0 > 0 && y1 / y0 > 50;
      function pad(a, b, log) {
        if (log) { return [a / 1.3, b * 1.3]; }
        var d = (b - a) || Math.abs(a) || 1;
        return [a - 0.06 * d, b + 0.06 * d];
      }
      var px = pad(x0, x1, logX), py = pad(y0, y1, logY);
      function scale(v, r, log, p0, p1) {
        var f = log ? (Math.log(v) - Math.log(r[0])) / (Math.log(r[1]) - Math.log(r[0]))
                    : (v - r[0]) / (r[1] - r[0]);
        return p0 + f * (p1 - p0);
      }
      var X = function (v) { return scale(v, px, logX, L, W - R); };
      var Y = function (v) { return scale(v, py, logY, H - B, T); };
      s.appendChild(svg("rect", {x: L, y: T, width: W - L - R, height: H - T - B,
                                 fill: "none", stroke: "#889"}));
      ticks(px[0], px[1], logX).forEach(function (t) {
        s.appendChild(svg("line", {x1: X(t), x2: X(t), y1: T, y2: H - B, stroke: "#e4e6ee"}));
        s.appendChild(svg("text", {"class": "xtick", x: X(t), y: H - B + 16,
                                   "text-anchor": "middle", "font-size": 11}, fmt(t)));
      });
      ticks(py[0], py[1], logY).forEach(function (t) {
        s.appendChild(svg("line", {x1: L, x2: W - R, y1: Y(t), y2: Y(t), stroke: "#e4e6ee"}));
        s.appendChild(svg("text", {"class": "ytick", x: L - 6, y: Y(t) + 4,
                                   "text-anchor": "end", "font-size": 11}, fmt(t)));
      });
      tasks.forEach(function (task) {
        var pts = [];
        idx.forEach(function (i, a) { if (onFront[a] && data.task[i] === task) { pts.push(a); } });
        if (pts.length < 2) { return; }
        pts.sort(function (a, b) { return xs[a] - xs[b] || ys[a] - ys[b]; });
        s.appendChild(svg("polyline", {"class": "front", fill: "none", stroke: "#000",
          "stroke-dasharray": "5 4", "stroke-width": 1, "data-task": task,
          points: pts.map(function (a) { return X(xs[a]) + "," + Y(ys[a]); }).join(" ")}));
      });
      idx.forEach(function (i, a) {
        var g = svg("g", {"class": onFront[a] ? "pt front" : "pt", "data-row": i,
                          "data-method": data.method[i], "data-task": data.task[i]});
        var m = marker(SHAPES[tasks.indexOf(data.task[i]) % SHAPES.length], X(xs[a]), Y(ys[a]),
                       onFront[a] ? 6 : 4.5);
        m.setAttribute("fill", data.colors[data.method[i]] || "#555");
        m.setAttribute("stroke", onFront[a] ? "#000" : "none");
        m.setAttribute("stroke-width", 1.5);
        g.appendChild(m);
        g.appendChild(svg("title", {}, data.method[i] + " on " + data.task[i] + ": " + cx +
                                       " " + fmt(xs[a]) + ", " + cy + " " + fmt(ys[a])));
        g.appendChild(svg("text", {x: X(xs[a]) + 6, y: Y(ys[a]) - 6, "font-size": 10},
                          data.method[i]));
        s.appendChild(g);
      });
    } else {
      s.appendChild(svg("text", {x: L + 20, y: T + 40, "font-size": 13},
        "No row the filters leave has both values."));
    }
    // Legend: colour = method, marker = task.
    var ly = T + 8;
    methods.forEach(function (m) {
      var c = svg("circle", {cx: W - R + 20, cy: ly, r: 5, fill: data.colors[m] || "#555"});
      s.appendChild(c);
      s.appendChild(svg("text", {x: W - R + 30, y: ly + 4, "font-size": 11}, m));
      ly += 16;
    });
    ly += 6;
    tasks.forEach(function (t, k) {
      var mk = marker(SHAPES[k % SHAPES.length], W - R + 20, ly, 5);
      mk.setAttribute("fill", "#888");
      s.appendChild(mk);
      s.appendChild(svg("text", {x: W - R + 30, y: ly + 4, "font-size": 11}, t));
      ly += 16;
    });
    plot.replaceChildren(s);
    var lines = tasks.map(function (task) {
      var best = [];
      idx.forEach(function (i, a) {
        if (onFront[a] && data.task[i] === task) { best.push(data.method[i]); }
      });
      return best.length ? task + ": " + best.join(", ") : null;
    }).filter(function (t) { return t; });
    note.textContent = idx.length + " of " + shown.length + " rows shown have both values" +
      (idx.length ? ". Pareto-optimal per task: " + lines.join("; ") + "." : ".");
  }

  function update() {
    var keep = {};
    visibleRows().forEach(function (i) { keep[i] = true; });
    var k = 0;
    rows.forEach(function (tr) {
      tr.hidden = !keep[+tr.dataset.row];
      if (!tr.hidden) { k++; }
    });
    count.textContent = "showing " + k + " of " + n + " rows";
    draw();
  }
  update();
})();
"""
