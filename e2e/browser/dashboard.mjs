// Drives Debian's chromium (headless, through playwright-core) over a running `fledge run`:
// the canary list, one canary's charts and decision log, and the decision simulator page.
// Used by e2e/tests/dashboard.rs; prints one JSON document on stdout.
//
//   node dashboard.mjs --base http://127.0.0.1:PORT --canary app --spec spec.yaml \
//        --scenario '{"canaryErrorRatio": 5}' --out DIR
//
// Every wait is bounded; the whole run stops itself after 150 s.
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

function args() {
  const out = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    out[argv[i].replace(/^--/, "")] = argv[i + 1];
  }
  for (const required of ["base", "canary", "spec", "scenario", "out"]) {
    if (!out[required]) { throw new Error(`missing --${required}`); }
  }
  return out;
}

const opts = args();
const watchdog = setTimeout(() => { console.error("dashboard.mjs: 150 s bound reached"); process.exit(3); }, 150_000);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "fledge-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.FLEDGE_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1360, height: 1000 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
});
const result = { list: [], detail: {}, simulator: {}, screenshots: [], pageErrors: [] };
try {
  const page = await context.newPage();
  page.on("pageerror", (e) => result.pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") { result.pageErrors.push(m.text()); } });

  // 1. The list of canaries.
  await page.goto(`${opts.base}/`);
  await page.waitForSelector('[data-testid="canary-row"]', { timeout: 20_000 });
  result.list = await page.$$eval('[data-testid="canary-row"]', (rows) => rows.map((r) => ({
    name: r.dataset.name, phase: r.dataset.phase, text: r.innerText,
  })));
  const listShot = path.join(opts.out, "dashboard-list.png");
  await page.screenshot({ path: listShot, fullPage: true });
  result.screenshots.push(listShot);

  // 2. One canary: charts with live data and the decision log.
  await page.click(`[data-testid="canary-row"][data-name="${opts.canary}"] a.name`);
  await page.waitForSelector('[data-testid="canary-detail"]', { timeout: 10_000 });
  await page.waitForFunction(() => {
    const points = (id) => Number((document.getElementById(id) || {}).dataset?.points || 0);
    return points("chart-rps") >= 3 && points("chart-success") >= 3 && points("chart-latency") >= 3 && points("chart-weight") >= 2;
  }, null, { timeout: 30_000, polling: 500 });
  result.detail = await page.evaluate(() => {
    const points = (id) => Number(document.getElementById(id).dataset.points);
    return {
      phase: document.querySelector('[data-testid="canary-detail"]').dataset.phase,
      message: document.querySelector('[data-testid="message"]')?.innerText ?? "",
      warnings: [...document.querySelectorAll('[data-testid="warnings"] li')].map((li) => ({ code: li.dataset.code, text: li.innerText })),
      charts: { weight: points("chart-weight"), rps: points("chart-rps"), success: points("chart-success"), latency: points("chart-latency") },
      svgPaths: document.querySelectorAll(".chart svg path").length,
      decisionLog: [...document.querySelectorAll('[data-testid="decision-log"] tbody tr')].map((r) => r.innerText),
      checks: [...document.querySelectorAll('[data-testid="checks"] tbody tr')].map((r) => r.innerText),
    };
  });
  const detailShot = path.join(opts.out, "dashboard-canary.png");
  await page.screenshot({ path: detailShot, fullPage: true });
  result.screenshots.push(detailShot);

  // 3. The decision simulator (fledge-core in WebAssembly).
  await page.goto(`${opts.base}/simulator`);
  await page.waitForSelector("body[data-simulator-ready]", { timeout: 20_000 });
  await page.fill('[data-testid="sim-spec"]', fs.readFileSync(opts.spec, "utf8"));
  const scenario = JSON.parse(opts.scenario);
  for (const [key, value] of Object.entries(scenario)) {
    const input = page.locator(`#${key}`);
    if (typeof value === "boolean") { await input.setChecked(value); } else { await input.fill(String(value)); }
  }
  await page.evaluate(() => { document.getElementById("result").innerHTML = ""; });
  await page.click('[data-testid="sim-run"]');
  const outcome = await page.waitForSelector('[data-testid="sim-outcome"]', { timeout: 30_000 });
  result.simulator = {
    outcome: await outcome.getAttribute("data-outcome"),
    intervals: Number(await outcome.getAttribute("data-intervals")),
    canaryRequests: Number(await outcome.getAttribute("data-canary-requests")),
    text: await outcome.innerText(),
    reason: await page.locator('[data-testid="sim-reason"]').innerText(),
    weightPoints: Number(await page.locator('[data-testid="sim-chart-weight"]').getAttribute("data-points")),
    decisions: await page.locator('[data-testid="sim-decisions"] tbody tr').count(),
  };
  const simShot = path.join(opts.out, "simulator.png");
  await page.screenshot({ path: simShot, fullPage: true });
  result.screenshots.push(simShot);
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
  clearTimeout(watchdog);
}
console.log(JSON.stringify(result));
