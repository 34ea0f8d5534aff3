// Fledge dashboard: the list of canaries and one canary's charts and decision log.
// Read-only: it polls the JSON API (GET only) every 2 s and never sends commands.
"use strict";
(function () {
  const POLL_MS = 2000;
  const esc = FledgeCharts.esc;
  const app = document.getElementById("app");
  const conn = document.getElementById("conn");
  let info = { commands: false };
  let timer = null;

  function route() {
    const m = location.hash.match(/^#\/canary\/([^/]+)$/);
    return m ? { view: "canary", name: decodeURIComponent(m[1]) } : { view: "list" };
  }

  async function getJson(url) {
    const response = await fetch(url, { cache: "no-store" });
    const body = await response.json();
    if (!response.ok) { throw new Error(body.error || response.statusText); }
    return body;
  }

  function weightBar(weight) {
    const w = Math.max(0, Math.min(100, weight || 0));
    return `<div class="weight" title="${w}% of requests to the canary"><div class="bar"><div style="width:${w}%"></div></div>` +
      `<span class="pct">${w}%</span></div>`;
  }

  function stepLabel(c) {
    return c.steps ? `${Math.min(c.step + 1, c.steps)}/${c.steps}` : "-";
  }

  function time(iso) {
    return iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) : "";
  }

  function num(v, digits) {
    if (v === null || v === undefined) { return "n/a"; }
    const d = digits === undefined ? 3 : digits;
    return String(Math.round(v * Math.pow(10, d)) / Math.pow(10, d));
  }

  // With targetRef (Kubernetes mode): the workload's phase, revision and replica counts.
  function workloadLine(w) {
    if (!w) { return ""; }
    const replicas = (r) => `${r.available}/${r.desired}`;
    return `<div class="muted" data-testid="workload">workload <span class="badge ${esc(w.phase)}">${esc(w.phase)}</span> ` +
      `${esc(w.image || "")} · primary ${replicas(w.primary)} · target ${replicas(w.target)}</div>`;
  }

  function workloadAlerts(w) {
    if (!w) { return ""; }
    return (w.weightsHeld ? `<div class="alert" data-testid="weights-held">${esc(w.weightsHeld)}</div>` : "") +
      (w.failure ? `<div class="alert">${esc(w.failure)}</div>` : "");
  }

  function renderList(canaries) {
    if (canaries.length === 0) {
      // A standby Kubernetes controller says so (its leader shows the canaries).
      app.innerHTML = info.note ? `<h1>Canaries</h1><p class="alert" data-testid="note">${esc(info.note)}</p>`
        : `<h1>Canaries</h1><p class="muted">No canaries. Start one with <code>fledge run -f canary.yaml</code>, ` +
          `or <code>kubectl apply</code> a Canary for <code>fledge controller</code>.</p>`;
      return;
    }
    const rows = canaries.map((c) => {
      const verdict = c.lastAnalysis ? `<span class="badge ${esc(c.lastAnalysis.verdict)}">${esc(c.lastAnalysis.verdict)}</span>` : `<span class="muted">—</span>`;
      return `<tr class="canary-row" data-testid="canary-row" data-name="${esc(c.name)}" data-phase="${esc(c.phase)}">` +
        `<td><a class="name" href="#/canary/${encodeURIComponent(c.name)}">${esc(c.name)}</a><div class="muted">${esc(c.service)}</div></td>` +
        `<td><span class="badge ${esc(c.phase)}">${esc(c.phase)}${c.pausedByOperator && c.phase !== "Paused" ? " (paused)" : ""}</span>${workloadLine(c.workload)}</td>` +
        `<td>${weightBar(c.canaryWeight)}</td>` +
        `<td class="num">${stepLabel(c)}</td>` +
        `<td class="num">${c.failedChecks}/${c.threshold}</td>` +
        `<td>${verdict}</td>` +
        `<td>${esc(c.message || (c.routerError ? "" : "-"))}${c.routerError ? `<div class="alert">blocked: ${esc(c.routerError)}</div>` : ""}` +
        `${warningCount(c)}</td></tr>`;
    }).join("");
    app.innerHTML = `<h1>Canaries</h1><table data-testid="canary-list"><thead><tr><th>Canary</th><th>Phase</th><th>Canary weight</th>` +
      `<th>Step</th><th>Failed</th><th>Last analysis</th><th>Latest decision</th></tr></thead><tbody>${rows}</tbody></table>` +
      `<p class="muted">Read-only view${info.commands ? "; steer with <code>fledge promote|abort|pause|resume|retry NAME</code>"
        : info.commandsDisabledReason ? `; ${esc(info.commandsDisabledReason)}` : ""}. ` +
      `Refreshes every ${POLL_MS / 1000} s.</p>`;
  }

  function chartBox(id) {
    return `<div class="chart" id="${id}" data-testid="${id}"></div>`;
  }

  function weightPoints(c, now) {
    // The weight over time, from the decision history (each transition sets the weight).
    const points = c.history.map((h) => [Date.parse(h.at), h.canaryWeight]);
    if (points.length) { points.push([now, c.canaryWeight]); }
    return points;
  }

  // "! 2 warnings" under a canary's message in the list: checks that do not run.
  function warningCount(c) {
    const n = (c.warnings || []).length;
    return n ? `<div class="warn" data-testid="warning-count">! ${n} warning${n === 1 ? "" : "s"}</div>` : "";
  }

  // Each warning with its field and its fix.
  function warningList(c) {
    const items = (c.warnings || []).map((w) => `<li data-code="${esc(w.code)}"><code>${esc(w.field)}</code>: ` +
      `${esc(w.message)}; <span class="fix">${esc(w.fix)}</span></li>`).join("");
    return items ? `<div class="warnings" data-testid="warnings"><strong>Warnings</strong><ul>${items}</ul></div>` : "";
  }

  function withUnit(v, unit) {
    return v === null || v === undefined ? "n/a" : `${num(v)}${unit || ""}`;
  }

  // One row of the last analysis. A comparison's verdict rests on its evidence, not on a bound
  // for the ratio, so its threshold column says what rolls back.
  function checkRow(k) {
    const c = k.comparison;
    const canary = c ? (c.ratio === null || c.ratio === undefined ? "no events yet" : `≈${num(c.ratio, 2)}× stable`) : withUnit(k.value, k.unit);
    const stable = c ? "" : (k.stableValue === null || k.stableValue === undefined ? "" : withUnit(k.stableValue, k.unit));
    const basis = c ? `evidence ${num(c.evidence, 2)} of ${num(c.evidenceNeeded, 1)} needed to roll back (tolerance ${num(c.tolerance)}×, p=${num(c.pValue)})`
      : range(k.threshold, k.unit);
    return `<tr><td>${esc(k.name)}</td><td class="num">${esc(canary)}</td><td class="num">${esc(stable)}</td>` +
      `<td class="num">${esc(basis)}</td><td><span class="badge ${esc(k.verdict)}">${esc(k.verdict)}</span></td><td>${esc(k.reason)}</td></tr>`;
  }

  function renderCanary(c) {
    const now = Date.now();
    const analysis = c.lastAnalysis;
    const checks = analysis ? analysis.checks.map(checkRow).join("") : "";
    const hooks = (c.webhooks || []).map((h) => {
      const call = h.lastCall;
      const state = !call ? `<span class="badge">not called</span>` : `<span class="badge ${call.ok ? "ok" : "failed"}">${call.ok ? "2xx" : "failed"}</span>`;
      return `<tr><td>${esc(h.name)}</td><td>${esc(h.type)}</td><td>${state}</td><td>${call ? esc(call.detail) : ""}</td>` +
        `<td class="num">${call ? call.durationMs + " ms" : ""}</td><td class="num">${call ? time(call.at) : ""}</td></tr>`;
    }).join("");
    const log = c.history.slice().reverse().map((h) => `<tr><td class="num">${time(h.at)}</td>` +
      `<td><span class="badge ${esc(h.phase)}">${esc(h.phase)}</span></td><td class="num">${h.canaryWeight}%</td>` +
      `<td class="num">${c.steps ? Math.min(h.step + 1, c.steps) + "/" + c.steps : "-"}</td><td>${esc(h.reason)}</td></tr>`).join("");
    app.innerHTML =
      `<p><a href="#/">← all canaries</a></p>` +
      `<div class="panel" data-testid="canary-detail" data-phase="${esc(c.phase)}"><div class="summary">` +
      `<div class="item"><div class="label">Canary</div><div class="value">${esc(c.name)}</div></div>` +
      `<div class="item"><div class="label">Phase</div><div class="value"><span class="badge ${esc(c.phase)}">${esc(c.phase)}</span></div></div>` +
      `<div class="item"><div class="label">Canary weight</div><div class="value">${weightBar(c.canaryWeight)}</div></div>` +
      `<div class="item"><div class="label">Step</div><div class="value">${stepLabel(c)}</div></div>` +
      `<div class="item"><div class="label">Failed checks</div><div class="value">${c.failedChecks}/${c.threshold}</div></div></div>` +
      (c.message ? `<div class="message" data-testid="message">${esc(c.message)}</div>` : "") +
      (c.workload ? workloadLine(c.workload) + `<div class="message">${esc(c.workload.message)}</div>` + workloadAlerts(c.workload) : "") +
      (c.routerError ? `<div class="alert">blocked: ${esc(c.routerError)}</div>` : "") +
      (c.conflict ? `<div class="alert">${esc(c.conflict)}</div>` : "") + warningList(c) + `</div>` +
      `<h2>Traffic</h2><div class="charts">${chartBox("chart-weight")}${chartBox("chart-rps")}${chartBox("chart-success")}${chartBox("chart-latency")}</div>` +
      `<h2>Last analysis ${analysis ? `· ${time(analysis.at)} · <span class="badge ${esc(analysis.verdict)}">${esc(analysis.verdict)}</span> · ` +
        `${analysis.canaryRequests} canary / ${analysis.stableRequests} stable requests` : ""}</h2>` +
      (analysis ? `<table data-testid="checks"><thead><tr><th>Check</th><th>Canary</th><th>Stable</th><th>Threshold</th><th>Verdict</th><th>Reason</th></tr></thead><tbody>${checks}</tbody></table>`
        : `<p class="muted">No analysis yet.</p>`) +
      (hooks ? `<h2>Webhooks</h2><table data-testid="webhooks"><thead><tr><th>Name</th><th>Type</th><th>Last call</th><th>Detail</th><th>Took</th><th>At</th></tr></thead><tbody>${hooks}</tbody></table>` : "") +
      `<h2>Decision log</h2><table data-testid="decision-log"><thead><tr><th>Time</th><th>Phase</th><th>Weight</th><th>Step</th><th>Reason</th></tr></thead><tbody>${log}</tbody></table>`;

    const series = c.series || [];
    const at = (p) => Date.parse(p.at);
    const xMin = Math.min(...[...series.map(at), ...c.history.map((h) => Date.parse(h.at))].filter(isFinite), now);
    const xs = { xMin: xMin, xMax: now };
    FledgeCharts.line(document.getElementById("chart-weight"), Object.assign({
      title: "Canary weight", unit: "%", yMin: 0, yMax: 100,
      series: [{ name: "canary", cls: "canary", color: "var(--canary)", step: true, points: weightPoints(c, now) }],
    }, xs));
    const both = (title, unit, pick, extra) => Object.assign({
      title, unit, empty: "waiting for the first analysis interval",
      series: [
        { name: "stable", cls: "stable", color: "var(--stable)", points: series.map((p) => [at(p), pick(p.stable)]) },
        { name: "canary", cls: "canary", color: "var(--canary)", points: series.map((p) => [at(p), pick(p.canary)]) },
      ],
    }, xs, extra || {});
    FledgeCharts.line(document.getElementById("chart-rps"), both("Requests per second", "", (s) => s.rps));
    const rates = series.flatMap((p) => [p.stable.successRate, p.canary.successRate]).filter((v) => v !== null && v !== undefined);
    FledgeCharts.line(document.getElementById("chart-success"), both("Success rate", "%", (s) => s.successRate,
      { yMin: Math.max(0, Math.floor(Math.min(95, ...rates))), yMax: 100 }));
    FledgeCharts.line(document.getElementById("chart-latency"), both("p99 latency", " ms", (s) => s.p99Ms));
  }

  // A passing range with its unit: "≥ 99%", "> 90% and ≤ 100%", "< 500 ms".
  function range(r, unit) {
    if (!r) { return ""; }
    const u = unit || "";
    const parts = [["≥", r.min], [">", r.above], ["≤", r.max], ["<", r.below]]
      .filter(([, v]) => v !== undefined && v !== null)
      .map(([op, v]) => `${op} ${v}${u}`);
    return parts.length ? parts.join(" and ") : "any";
  }

  async function refresh() {
    const r = route();
    try {
      if (r.view === "canary") {
        renderCanary(await getJson(`/api/v1/canaries/${encodeURIComponent(r.name)}`));
      } else {
        renderList(await getJson("/api/v1/canaries"));
      }
      conn.textContent = `live · updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
      conn.classList.remove("down");
    } catch (e) {
      conn.textContent = `cannot reach fledge: ${e.message}`;
      conn.classList.add("down");
      if (r.view === "canary" && /no canary/.test(e.message)) {
        app.innerHTML = `<p><a href="#/">← all canaries</a></p><p class="alert">${esc(e.message)}</p>`;
      }
    }
  }

  function start() {
    if (timer) { clearInterval(timer); }
    refresh();
    timer = setInterval(refresh, POLL_MS);
  }

  window.addEventListener("hashchange", start);
  getJson("/api/v1/info").then((i) => { info = i; }).catch(() => {}).finally(start);
})();
