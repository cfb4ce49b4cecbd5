#!/usr/bin/env node
// Opens a Temporal Web UI page in headless Chromium (the system's, via playwright-core) and
// reports what it shows.
//
// Usage: node ui_page.mjs --url URL [--expect TEXT] [--wait-for TEXT] [--screenshot FILE]
//                         [--codec PREFIX] [--timeout MS] [--chromium PATH]
//   --expect TEXT    wait until TEXT is on the page (fails if it never appears)
//   --wait-for TEXT  wait until TEXT is on the page before judging (e.g. "binary/encrypted")
//   --click TEXT     then click the first element showing exactly TEXT (navigate in the app)
//   --codec PREFIX   record the status of every response whose URL starts with PREFIX
//   --authorization VALUE  send `Authorization: VALUE` with the page's requests (as a UI that
//                    passes its user's access token to the codec server would)
// Prints one JSON line: {"ok", "found", "codec": [{url, method, status}], "text": "..."}
import { chromium } from 'playwright-core';

function parse(argv) {
  const args = { timeout: 30000, chromium: '/usr/bin/chromium' };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    args[key] = argv[i + 1];
  }
  args.timeout = Number(args.timeout);
  return args;
}

async function main() {
  const args = parse(process.argv);
  const out = { ok: false, found: false, codec: [] };
  const browser = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run',
    ],
  });
  try {
    const options = { viewport: { width: 1400, height: 1000 } };
    if (args.authorization) options.extraHTTPHeaders = { Authorization: args.authorization };
    const page = await browser.newPage(options);
    if (args.codec) {
      page.on('response', (response) => {
        if (response.url().startsWith(args.codec)) {
          out.codec.push({
            url: response.url(), method: response.request().method(), status: response.status(),
          });
        }
      });
    }
    await page.goto(args.url, { waitUntil: 'domcontentloaded', timeout: args.timeout });
    // The text of the page and of its frames (the Web UI renders Markdown in an iframe).
    const allText = async () => {
      const parts = [];
      for (const frame of page.frames()) {
        try {
          parts.push(await frame.evaluate(() => (document.body ? document.body.innerText : '')));
        } catch (e) {
          // A frame that is navigating has no text yet.
        }
      }
      return parts.join('\n');
    };
    const waitText = async (text) => {
      const until = Date.now() + args.timeout;
      while (Date.now() < until) {
        if ((await allText()).includes(text)) return true;
        await page.waitForTimeout(200);
      }
      return false;
    };
    let judged = true;
    if (args['wait-for']) judged = await waitText(args['wait-for']);
    if (args.click) {
      judged = judged && await waitText(args.click);
      // Let the page finish loading first: a click while it still loads is undone by it.
      await page.waitForLoadState('networkidle', { timeout: 10000 }).catch(() => {});
      await page.getByText(args.click, { exact: true }).first().click({ timeout: args.timeout });
    }
    if (args.expect) out.found = await waitText(args.expect);
    // When watching the codec server, wait for the page's first decode call to be answered.
    if (args.codec) {
      const until = Date.now() + Math.min(args.timeout, 15000);
      while (!out.codec.some((c) => c.method === 'POST') && Date.now() < until) {
        await page.waitForTimeout(200);
      }
    }
    // Let the page render what it got before the picture.
    await page.waitForTimeout(1000);
    const text = await allText();
    if (args.expect && !out.found) out.found = text.includes(args.expect);
    out.text = text.slice(0, 4000);
    out.waited = judged;
    if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
    out.ok = judged && (args.expect ? out.found : true);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.stack || e) }) + '\n');
  process.exit(1);
});
