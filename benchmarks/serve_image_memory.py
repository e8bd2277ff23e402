"""Server memory for four 7000x7000 PNGs (~210 KB each) sent at once, when the image budget lets them in.

    python benchmarks/serve_image_memory.py REPO_ROOT PORT [serve flags...]
    python benchmarks/serve_image_memory.py . 18443 --max-image-memory 1000000000

Starts `REPO_ROOT/.venv/bin/himap-trt serve` on /tmp/i24/export-tiny (edit EXPORT), sends the four
requests concurrently (max_tokens 2) and prints one JSON line: statuses, the server's peak RSS growth
(VmHWM - VmRSS before) and the RSS still held one second after the answers (MB). REPO_ROOT may be
another checkout (e.g. main) to compare.
"""
import asyncio, base64, io, json, subprocess, sys, time, os
import httpx, numpy as np
from PIL import Image
EXPORT = os.environ.get("EXPORT", "/tmp/i24/export-tiny")
root, port = sys.argv[1], int(sys.argv[2])
def status(pid, key):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith(key): return int(l.split()[1]) // 1024
proc = subprocess.Popen([f"{root}/.venv/bin/himap-trt", "serve", "--export-dir", EXPORT, "--port", str(port), "--log-level", "warning", "--max-batch", "4", *sys.argv[3:]], cwd=root, stderr=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"
for _ in range(240):
    try:
        if httpx.get(base + "/health").status_code == 200: break
    except Exception: pass
    time.sleep(0.5)
rng = np.random.default_rng(0)
urls = []
for i in range(4):
    
    b = io.BytesIO(); Image.fromarray((np.indices((7000, 7000)).sum(0) % 256).astype(np.uint8)).convert("RGB").save(b, "PNG")
    urls.append("data:image/png;base64," + base64.b64encode(b.getvalue()).decode())
body = lambda u: {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}, {"type": "text", "text": "What?"}]}]}
before_rss, before_hwm = status(proc.pid, "VmRSS"), status(proc.pid, "VmHWM")
async def main():
    async with httpx.AsyncClient(timeout=300) as c:
        return await asyncio.gather(*(c.post(base + "/v1/chat/completions", json=body(u)) for u in urls))
t = time.perf_counter(); rs = asyncio.run(main()); wall = time.perf_counter() - t
time.sleep(1)
print(json.dumps({"root": root, "encoded_kb": len(urls[0]) // 1024, "statuses": [r.status_code for r in rs], "wall_s": round(wall, 1),
      "rss_before_mb": before_rss, "peak_growth_mb": status(proc.pid, "VmHWM") - before_rss, "rss_after_mb": status(proc.pid, "VmRSS"),
      "held_after_mb": status(proc.pid, "VmRSS") - before_rss, "load": os.getloadavg()}))
proc.terminate(); proc.wait(60)
