"""Open pages of the built book in headless Chromium and fail if a page or an image does not load.

    python .ci/check_pages.py _build/html index.html nbs/01_tracing.html --images nbs/01_tracing.html

The book is served on 127.0.0.1 by a small HTTP server. Chromium opens a checker page from the
same server, which loads each page in an iframe (after `fetch` confirmed it exists: a 404 is a
failure), forces every image to load eagerly, waits for them, and posts back, per page: its
title, its navigation links and every image that did not decode (`naturalWidth == 0`). A page
named with `--images` must also contain at least one image (it is the one with a figure).
`--expect-failure` inverts the exit status, which is how CI proves the check can fail.
"""
import argparse
import functools
import http.server
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

CHECKER = """<!doctype html><html><body><script>
const pages = %s;
async function check(url) {
  const res = {url: url, ok: false, images: 0, broken: [], nav: [], title: ""};
  try {
    const r = await fetch(url, {cache: "no-store"});
    res.status = r.status;
    if (!r.ok) return res;
  } catch (e) { res.error = String(e); return res; }
  await new Promise(done => {
    const f = document.createElement("iframe");
    f.style.width = "1280px"; f.style.height = "1000px";
    f.onload = async () => {
      const d = f.contentDocument;
      const imgs = Array.from(d.images);
      imgs.forEach(i => { i.loading = "eager"; });
      await Promise.all(imgs.map(i => (i.complete && i.naturalWidth > 0) ? null :
        new Promise(r => { i.addEventListener("load", r); i.addEventListener("error", r); setTimeout(r, 15000); })));
      res.title = d.title;
      res.images = imgs.length;
      res.broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
      res.nav = Array.from(d.querySelectorAll("nav.bd-docs-nav a, .bd-sidebar-primary a.reference.internal"))
                  .map(a => a.textContent.trim()).filter(t => t);
      res.ok = true;
      done();
    };
    f.src = url;
    document.body.appendChild(f);
  });
  return res;
}
(async () => {
  const results = [];
  for (const p of pages) results.push(await check(p));
  await fetch("/__result__", {method: "POST", body: JSON.stringify(results)});
})();
</script></body></html>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def serve(root: str, pages: list[str], results: "queue.Queue"):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/__pagecheck__"):
                body = (CHECKER % json.dumps(["/" + p for p in pages])).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                super().do_GET()

        def do_POST(self):
            data = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()
            results.put(json.loads(data))

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a browser killed mid-request is not news
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    httpd = Server(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("check_pages: Chromium not found (Debian: apt-get install -y chromium).")


def run(root: str, pages: list[str], need_images: list[str], nav: list[str], screenshots: str | None,
        timeout: float) -> list[str]:
    results: queue.Queue = queue.Queue()
    httpd = serve(root, pages, results)
    port = httpd.server_address[1]
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    proc = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"http://127.0.0.1:{port}/__pagecheck__.html"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        got = results.get(timeout=timeout)
    except queue.Empty:
        got = None
    finally:
        proc.kill()
        proc.wait()
    failures = []
    if got is None:
        failures.append(f"no answer from Chromium within {timeout:.0f} s")
        got = []
    for r in got:
        page = r["url"].lstrip("/")
        if not r["ok"]:
            failures.append(f"{page}: page did not load (HTTP {r.get('status')}, {r.get('error', '')})")
            continue
        print(f"  {page}: title {r['title']!r}, {r['images']} images, {len(r['broken'])} broken, "
              f"{len(r['nav'])} navigation links")
        for src in r["broken"]:
            failures.append(f"{page}: image does not load: {src}")
        if page in need_images and r["images"] == 0:
            failures.append(f"{page}: expected at least one figure, found no image")
        if page == pages[0]:
            for text in nav:
                if not any(text in link for link in r["nav"]):
                    failures.append(f"{page}: navigation has no link {text!r} (links: {r['nav']})")
    if screenshots:
        os.makedirs(screenshots, exist_ok=True)
        for page in pages:
            out = os.path.join(screenshots, page.replace("/", "_").replace(".html", ".png"))
            shot_profile = tempfile.mkdtemp(prefix="chromium-profile-")  # a killed browser leaves its profile locked
            try:  # screenshots are for people to look at: best effort, never the verdict
                subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={shot_profile}", "--window-size=1280,1600",
                                "--hide-scrollbars", "--virtual-time-budget=5000", f"--screenshot={os.path.abspath(out)}",
                                f"http://127.0.0.1:{port}/{page}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
                print(f"  screenshot: {out}")
            except subprocess.TimeoutExpired:
                print(f"  screenshot of {page} timed out (not a failure)")
            shutil.rmtree(shot_profile, ignore_errors=True)
    httpd.shutdown()
    shutil.rmtree(profile, ignore_errors=True)
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the built site, e.g. _build/html")
    ap.add_argument("pages", nargs="+", help="pages to open, relative to root")
    ap.add_argument("--images", nargs="*", default=[], help="pages that must contain at least one image")
    ap.add_argument("--nav", nargs="*", default=[], help="link texts the first page's navigation must contain")
    ap.add_argument("--screenshots", help="also save a PNG of each page into this folder")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--expect-failure", action="store_true", help="succeed only if the check fails")
    args = ap.parse_args()
    failures = run(args.root, args.pages, args.images, args.nav, args.screenshots, args.timeout)
    for f in failures:
        print("  FAIL", f)
    if args.expect_failure:
        print("check_pages: failed as expected" if failures else "check_pages: expected a failure, got none")
        return 0 if failures else 1
    print("check_pages: OK" if not failures else f"check_pages: {len(failures)} failure(s)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
