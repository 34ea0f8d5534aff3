// The decision simulator page: runs fledge-core (WebAssembly) on a pasted spec.
import init, { simulate, version } from "/ui/pkg/fledge_rollout_sim_web.js";

const esc = window.FledgeCharts.esc;
const $ = (id) => document.getElementById(id);

const EXAMPLE = `apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: checkout}
spec:
  service: checkout
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource:
    envoyAdmin: {urls: ["http://127.0.0.1:9901"]}
  router:
    envoyRds:
      path: /etc/envoy/rds/routes.json
      routeConfiguration: fledge_route
      virtualHost: checkout
      route: primary
      stableCluster: checkout_stable
      canaryCluster: checkout_canary
      adminUrl: http://127.0.0.1:9901
  analysis:
    interval: 30s
    threshold: 5
    steps:
      - setWeight: 10
      - pause: {duration: 5m}
      - setWeight: 30
      - pause: {duration: 5m}
      - setWeight: 60
    compareWithStable: {}
    metrics:
      - name: request-duration
        quantile: 0.99
        thresholdRange: {max: 1000}
`;

const DEFAULTS = {
  requestsPerMinute: 600, stableErrorPercent: 1, canaryErrorRatio: 1, canaryLatencyFactor: 1, medianMs: 100,
  degradeAfterMinutes: 0, seed: 1, maxMinutes: 720, promoteAtPauses: true,
};
const PRESETS = [
  ["Healthy", {}],
  ["Errors ×2", { canaryErrorRatio: 2 }],
  ["Errors ×5", { canaryErrorRatio: 5 }],
  ["Latency ×1.2", { canaryLatencyFactor: 1.2 }],
  ["Canary down (100% 5xx)", { canaryErrorRatio: 100 }],
  ["Breaks after 10 min", { canaryErrorRatio: 5, degradeAfterMinutes: 10 }],
  ["Low traffic (20/min)", { requestsPerMinute: 20 }],
];

function setScenario(values) {
  const all = Object.assign({}, DEFAULTS, values);
  for (const [key, value] of Object.entries(all)) {
    const input = $(key);
    if (input.type === "checkbox") { input.checked = value; } else { input.value = value; }
  }
}

function readScenario() {
  const out = {};
  for (const key of Object.keys(DEFAULTS)) {
    const input = $(key);
    out[key] = input.type === "checkbox" ? input.checked : Number(input.value);
  }
  out.latencySigma = 0.6;
  return out;
}

function time(minutes) {
  if (minutes < 60) { return `${Math.round(minutes * 10) / 10} min`; }
  return `${Math.floor(minutes / 60)} h ${Math.round(minutes % 60)} min`;
}

function render(report) {
  const result = $("result");
  if (report.error) {
    const problems = (report.problems || []).map((p) => `\n• ${p.field}: ${p.problem}; ${p.fix}`).join("");
    result.innerHTML = `<div class="outcome Error" data-testid="sim-outcome" data-outcome="Error">${esc(report.error + problems)}</div>`;
    return;
  }
  const verb = {
    Promoted: "Promoted", RolledBack: "Rolled back", Halted: "Halted (still undecided)",
    Paused: "Paused (waiting for promote)", Progressing: "Still progressing", Initializing: "Not started",
  }[report.outcome] || report.outcome;
  const when = report.decided ? `after ${time(report.minutes)}` : `at the ${time(report.minutes)} horizon`;
  const errors = (n, d) => (d ? (100 * n / d).toFixed(2) + "%" : "n/a");
  const warnings = report.warnings.map((w) => `<p class="muted">⚠ ${esc(w)}</p>`).join("");
  const log = report.decisions.map((d) => `<tr><td class="num">${time(d.minutes)}</td><td><span class="badge ${esc(d.phase)}">${esc(d.phase)}</span></td>` +
    `<td class="num">${d.weight}%</td><td class="num">${d.step}/${report.steps}</td><td>${esc(d.reason)}</td></tr>`).join("");
  result.innerHTML =
    `<div class="outcome ${esc(report.outcome)}" data-testid="sim-outcome" data-outcome="${esc(report.outcome)}" ` +
    `data-intervals="${report.intervals}" data-canary-requests="${report.canaryRequests}">${esc(verb)} ${esc(when)} ` +
    `(${report.intervals} intervals, ${report.canaryRequests.toLocaleString("en")} canary requests)</div>` +
    `<p data-testid="sim-reason">${esc(report.reason)}</p>` +
    `<p class="muted">Canary errors ${errors(report.canaryErrors, report.canaryRequests)} of ${report.canaryRequests.toLocaleString("en")} · ` +
    `stable ${errors(report.stableErrors, report.stableRequests)} of ${report.stableRequests.toLocaleString("en")} · failed checks ${report.failedChecks}</p>` +
    warnings +
    `<div class="charts"><div class="chart" id="sim-weight" data-testid="sim-chart-weight"></div>` +
    `<div class="chart" id="sim-errors" data-testid="sim-chart-errors"></div></div>` +
    `<h2>Decisions</h2><table data-testid="sim-decisions"><thead><tr><th>At</th><th>Phase</th><th>Weight</th><th>Step</th><th>Reason</th></tr></thead>` +
    `<tbody>${log}</tbody></table>`;
  const x = (p) => p.minutes;
  const xFormat = (m) => time(m);
  const weights = [[0, 0]].concat(report.decisions.map((d) => [d.minutes, d.weight]));
  weights.push([report.minutes, report.decisions.length ? report.decisions[report.decisions.length - 1].weight : 0]);
  window.FledgeCharts.line($("sim-weight"), {
    title: "Canary weight", unit: "%", yMin: 0, yMax: 100, xMin: 0, xMax: Math.max(report.minutes, 1), xFormat,
    series: [{ name: "canary", cls: "canary", color: "var(--canary)", step: true, points: weights }],
  });
  window.FledgeCharts.line($("sim-errors"), {
    title: "Error rate per interval", unit: "%", xMin: 0, xMax: Math.max(report.minutes, 1), xFormat,
    series: [
      { name: "stable", cls: "stable", color: "var(--stable)", points: report.timeline.map((p) => [x(p), p.stableErrorPercent]) },
      { name: "canary", cls: "canary", color: "var(--canary)", points: report.timeline.map((p) => [x(p), p.canaryErrorPercent]) },
    ],
  });
}

function run() {
  const started = performance.now();
  const json = simulate($("spec").value, JSON.stringify(readScenario()));
  const report = JSON.parse(json);
  render(report);
  $("engine").textContent = `fledge-core ${version()} (WebAssembly) · simulated in ${Math.round(performance.now() - started)} ms`;
}

async function main() {
  $("spec").value = EXAMPLE;
  setScenario({});
  const presets = $("presets");
  for (const [name, values] of PRESETS) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "secondary";
    button.textContent = name;
    button.addEventListener("click", () => { setScenario(values); run(); });
    presets.appendChild(button);
  }
  try {
    await init({ module_or_path: "/ui/pkg/fledge_rollout_sim_web_bg.wasm" });
  } catch (e) {
    $("engine").textContent = "simulator not available";
    $("result").innerHTML = `<div class="outcome Error" data-testid="sim-outcome" data-outcome="Unavailable">The WebAssembly simulator is not in this build of fledge: run <code>make simulator</code>, then rebuild fledge. (${esc(e.message)})</div>`;
    return;
  }
  $("engine").textContent = `fledge-core ${version()} (WebAssembly) ready`;
  $("run").addEventListener("click", run);
  document.body.dataset.simulatorReady = "true";
  run();
}

main();
