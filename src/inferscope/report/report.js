// inferscope report: draws the data block (#inferscope-data) with uPlot.
// Every name and value from the recorder reaches the page through textContent, never as markup.
(function () {
  "use strict";

  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
  var MARKER = "rgba(214, 39, 40, 0.75)";
  var charts = [];
  window.inferscopeCharts = charts;

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function when(unix) {
    if (unix === null || unix === undefined) return "-";
    var d = new Date(unix * 1000);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
      two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) return "-";
    return Number(value).toFixed(digits === undefined ? 3 : digits);
  }

  function signed(value, digits) {
    var text = fmt(value, digits);
    return value > 0 ? "+" + text : text;
  }

  function percent(change) {
    return (change > 0 ? "+" : "") + Math.round(change * 100) + "%";
  }

  function show(value) {
    if (value === null || value === undefined) return "-";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // Two charts side by side on a wide page, one on a narrow one (the grid's columns, in CSS).
  function chartWidth(container) {
    var width = container.clientWidth || 900;
    return Math.max(300, Math.floor(width >= 900 ? width / 2 - 24 : width - 8));
  }

  // Vertical lines at each regression's start; the regressions near the cursor are named below the chart.
  function markersPlugin(regressions, info) {
    return {
      hooks: {
        draw: [function (u) {
          var ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = MARKER;
          ctx.lineWidth = 2 * devicePixelRatio;
          ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
          regressions.forEach(function (r) {
            var x = Math.round(u.valToPos(r.since, "x", true));
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          });
          ctx.restore();
        }],
        setCursor: [function (u) {
          var left = u.cursor.left;
          var near = left === null || left < 0 ? [] : regressions.filter(function (r) {
            return Math.abs(u.valToPos(r.since, "x") - left) <= 6;
          });
          info.textContent = near.map(function (r) { return "regression: " + r.summary; }).join("\n");
        }]
      }
    };
  }

  function buildChart(model, chart, container, syncKey) {
    var box = el("div", null, "chart");
    box.dataset.chart = chart.id;
    box.appendChild(el("h3", chart.title + " (" + chart.unit + ")"));
    var info = el("pre", null, "marker-info");
    container.appendChild(box);
    var n = model.time.length;
    var data = [model.time];
    var raw = [null];
    var series = [{}];
    var list = chart.series.slice();
    if (chart.stacked) list.reverse(); // the largest sum is drawn first, the lower layers over it
    var sums = new Array(n).fill(0);
    var stacked = [];
    if (chart.stacked) {
      chart.series.forEach(function (s) {
        var layer = s.values.map(function (v, i) { sums[i] += (v === null ? 0 : v); return v === null ? null : sums[i]; });
        stacked.push(layer);
      });
      stacked.reverse();
    }
    // A reference line takes the colour of the series it belongs to ("like"); the layers of one
    // stage share a colour, its off-CPU layer lighter than its CPU layer.
    var colors = {};
    chart.series.forEach(function (s) {
      var name = s.group || s.label;
      if (!s.like && !(name in colors)) colors[name] = PALETTE[Object.keys(colors).length % PALETTE.length];
    });
    list.forEach(function (s, index) {
      var color = colors[s.like || s.group || s.label] || PALETTE[index % PALETTE.length];
      var values = chart.stacked ? stacked[index] : s.values;
      data.push(values);
      raw.push(s.values);
      series.push({
        label: s.label,
        stroke: color,
        width: s.dash ? 1 : 1.5,
        dash: s.dash ? [6, 4] : undefined,
        fill: chart.stacked ? color + (s.light ? "55" : "cc") : undefined,
        spanGaps: false,
        value: function (u, v, si, idx) {
          var own = idx === null || idx === undefined ? v : raw[si][idx];
          return own === null || own === undefined ? "-" : String(own);
        }
      });
    });
    var opts = {
      width: chartWidth(container),
      height: 220,
      series: series,
      scales: { x: { time: true } },
      axes: [{}, { label: chart.unit, size: 60 }],
      cursor: { sync: { key: syncKey } },
      legend: { live: true },
      plugins: [markersPlugin(model.regressions, info)]
    };
    var plot = new uPlot(opts, data, box);
    box.appendChild(info);
    charts.push({ model: model.model, id: chart.id, title: chart.title, plot: plot });
  }

  function taxLine(model) {
    var line = el("li");
    line.appendChild(el("strong", model.model));
    var tax = model.tax;
    if (model.anchor === null) {
      line.appendChild(el("span", ": no anchor yet (taken once the model has baseline_seconds of history)"));
    } else if (tax === null) {
      line.appendChild(el("span", ": too few recent calls to compare with the anchor"));
    } else {
      line.appendChild(el("span",
        ": " + signed(tax.latency_p50_ms) + " ms at p50, " + signed(tax.latency_p95_ms) + " ms at p95 per inference; " +
        signed(tax.cpu_hours_per_day) + " CPU-hours per day at " + fmt(tax.calls_per_second, 1) + " calls/s, against the anchor" +
        (tax.since_unix !== null ? "; since " + when(tax.since_unix) : "; no regression open")));
    }
    line.dataset.model = model.model;
    return line;
  }

  function regressionTable(model) {
    var table = el("table", null, "regressions");
    var head = el("tr");
    ["since", "state", "cause", "stage", "metric", "change", "anchor -> now", "evidence"].forEach(function (h) { head.appendChild(el("th", h)); });
    table.appendChild(head);
    model.regressions.forEach(function (r) {
      var row = el("tr");
      row.dataset.regression = [r.stage || "", r.metric, r.since].join("|");
      var memory = r.metric === "rss" || r.metric === "py_heap";
      var scale = memory ? 1 / (1024 * 1024) : 1000;
      var unit = memory ? " MB" : " ms";
      var evidence = el("td");
      var details = el("details");
      details.appendChild(el("summary", (r.evidence && r.evidence.why) || "evidence"));
      Object.keys(r.evidence || {}).forEach(function (name) {
        if (name === "why") return;
        details.appendChild(el("div", name + ": " + show(r.evidence[name]), "evidence"));
      });
      evidence.appendChild(details);
      if (r.profile) {
        // The regressed stage's stacks, sampled as it opened: its top functions.
        var sampled = el("details", null, "profile");
        sampled.appendChild(el("summary", "top functions: " + r.profile.samples + " sampled stacks (" +
          r.profile.attribution + ")"));
        r.profile.top.forEach(function (t) {
          sampled.appendChild(el("div", percent(t.share).replace("+", "") + " " + t.function, "evidence"));
        });
        evidence.appendChild(sampled);
      }
      [when(r.since), r.active ? "active" : "closed", r.cause, r.stage || "(inference)", r.metric, percent(r.change),
        fmt(r.baseline_value * scale) + unit + " -> " + fmt(r.current_value * scale) + unit].forEach(function (text) {
        row.appendChild(el("td", text));
      });
      row.appendChild(evidence);
      table.appendChild(row);
    });
    return table;
  }

  function modelSection(model, index) {
    var section = el("section", null, "model");
    section.dataset.model = model.model;
    section.appendChild(el("h2", model.model));
    var meta = "service " + model.service + "; versions " + (model.versions.join(", ") || "-") + "; " + model.windows +
      " window(s), one point per " + fmt(model.bucket_seconds, model.bucket_seconds < 10 ? 1 : 0) + " s";
    section.appendChild(el("p", meta, "meta"));
    if (model.anchor !== null) {
      section.appendChild(el("p", "anchor (" + model.anchor.source + "): " + when(model.anchor.start_unix) + " to " +
        when(model.anchor.end_unix) + "; dashed lines on the latency chart", "meta"));
    }
    if (model.charts.length === 0) section.appendChild(el("p", "no window of this model has enough calls to plot"));
    var grid = el("div", null, "charts");
    section.appendChild(grid);
    document.getElementById("report").appendChild(section);
    model.charts.forEach(function (chart) { buildChart(model, chart, grid, "model-" + index); });
    section.appendChild(el("h3", "Regressions (" + model.regressions.length + ")"));
    if (model.regressions.length === 0) section.appendChild(el("p", "none in this period"));
    else section.appendChild(regressionTable(model));
  }

  function environmentSection(timeline) {
    var section = el("section", null, "environment");
    section.appendChild(el("h2", "Environment timeline"));
    if (timeline.length === 0) section.appendChild(el("p", "no environment recorded in this period"));
    timeline.forEach(function (env, index) {
      var item = el("div", null, "env");
      item.appendChild(el("h3", when(env.first_seen_unix) + " to " + when(env.last_seen_unix) + ": environment " + env.fingerprint));
      item.appendChild(el("p", "Python " + show(env.python) + " on " + show(env.cpu_model), "meta"));
      if (index > 0 && env.changes.length === 0) item.appendChild(el("p", "no change shown (only left-out fields differ)"));
      if (env.changes.length > 0) {
        var table = el("table", null, "changes");
        env.changes.forEach(function (c) {
          var row = el("tr");
          row.appendChild(el("td", c.kind));
          row.appendChild(el("td", c.path));
          row.appendChild(el("td", c.kind === "added" ? show(c.new) : c.kind === "removed" ? show(c.old) : show(c.old) + " -> " + show(c.new)));
          table.appendChild(row);
        });
        item.appendChild(table);
      }
      section.appendChild(item);
    });
    document.getElementById("report").appendChild(section);
  }

  function compareSection(compared) {
    compared.forEach(function (result) {
      var section = el("section", null, "compare");
      section.appendChild(el("h2", result.title));
      var table = el("table", null, "compare-table");
      var head = el("tr");
      result.columns.forEach(function (c) { head.appendChild(el("th", c)); });
      table.appendChild(head);
      result.rows.forEach(function (cells) {
        var row = el("tr");
        cells.forEach(function (c) { row.appendChild(el("td", c)); });
        table.appendChild(row);
      });
      section.appendChild(table);
      var notes = el("ul");
      result.notes.forEach(function (n) { notes.appendChild(el("li", n)); });
      section.appendChild(notes);
      document.getElementById("report").appendChild(section);
    });
  }

  function render(data) {
    charts.forEach(function (c) { c.plot.destroy(); });
    charts.length = 0;
    var root = document.getElementById("report");
    root.replaceChildren();
    document.getElementById("period").textContent = "From " + when(data.since_unix) + " to " + when(data.until_unix) +
      ", recorder " + data.recorder + ", generated " + when(data.generated_unix);
    var summary = el("section", null, "tax");
    summary.appendChild(el("h2", "The tax, per model"));
    var lines = el("ul");
    data.models.forEach(function (m) { lines.appendChild(taxLine(m)); });
    if (data.models.length === 0) lines.appendChild(el("li", "no model was recorded in this period"));
    summary.appendChild(lines);
    root.appendChild(summary);
    data.models.forEach(modelSection);
    environmentSection(data.environment);
    compareSection(data.compare || []);
    document.body.dataset.ready = String(Number(document.body.dataset.ready || 0) + 1);
    // Milliseconds from the start of navigation to the last chart drawn (benchmarks/report.py reads it).
    document.body.dataset.renderedMs = String(Math.round(performance.now()));
  }

  var data = JSON.parse(document.getElementById("inferscope-data").textContent);
  render(data);

  var resizing = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizing);
    resizing = setTimeout(function () {
      charts.forEach(function (c) {
        var grid = c.plot.root.parentNode.parentNode;
        c.plot.setSize({ width: chartWidth(grid), height: 220 });
      });
    }, 150);
  });

  var mode = document.querySelector('meta[name="inferscope-mode"]').getAttribute("content");
  if (mode === "served") {
    setInterval(function () {
      fetch("data.json", { cache: "no-store" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (fresh) { if (fresh) render(fresh); })
        .catch(function () {});
    }, (data.refresh_seconds || 10) * 1000);
  }
})();
