"""Load test for `nanovlm serve`: requests/s and tokens/s at several client concurrencies.

Starts the server itself on loopback (a separate process, so the clients do not share its
interpreter) from --model DIR, or from a tiny random checkpoint when no model is given; or
measures a running server with --url. Each client is a thread with one keep-alive connection
sending easy-VQA questions with an image (greedy, non-streaming). Bounded: every level stops
after --requests-per-client requests per client or --max-seconds, whichever comes first.

    python benchmarks/serve_load.py                      # tiny random model
    python benchmarks/serve_load.py --preset easyvqa     # random model of the demo's size
    python benchmarks/serve_load.py --model runs/demo/final
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 1,4,16

Prints a markdown table; no timed assertions.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse


def random_checkpoint(directory: str, preset: str) -> str:
    """A randomly initialised checkpoint of a preset's size (no backbone download)."""
    import torch

    from nanovlm import VLMConfig, VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset(preset), load_backbone=False)
    path = os.path.join(directory, preset)
    model.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nanovlm", "serve", "--model", model_dir, "--port", str(port),
           "--max-batch-size", str(max_batch_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if get_json(url, "/health")["status"] == "ok":
                return proc, url
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the server did not come up within 120 s")


def get_json(url: str, path: str) -> dict:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def workload(n: int) -> list[dict]:
    """n (image, question) chat messages from the easy-VQA test split (drawn shapes without it)."""
    try:
        from easy_vqa import get_test_image_paths, get_test_questions
    except ImportError:
        return [_message(_drawn_png(i), "what shape is in the image?") for i in range(n)]
    questions, _, image_ids = get_test_questions()
    paths = get_test_image_paths()
    out = []
    for i in range(n):
        with open(paths[image_ids[i]], "rb") as f:
            out.append(_message(f.read(), questions[i]))
    return out


def _message(png: bytes, question: str) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def _drawn_png(i: int) -> bytes:
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((8 + i % 16, 8, 48, 40 + i % 16), fill=((37 * i) % 256, 90, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def run_level(url: str, model: str, messages: list[dict], clients: int, per_client: int, max_tokens: int,
              max_seconds: float) -> dict:
    parts = urllib.parse.urlsplit(url)
    latencies: list[float] = []
    tokens = [0]
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=max_seconds + 30)
        for j in range(per_client):
            if time.monotonic() > deadline:
                break
            body = json.dumps({"model": model, "messages": [messages[(k * per_client + j) % len(messages)]],
                               "max_tokens": max_tokens, "temperature": 0})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
                ok = response.status == 200
            except (OSError, ValueError, http.client.HTTPException):
                ok, payload = False, {}
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=max_seconds + 30)
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                    tokens[0] += payload["usage"]["completion_tokens"]
                else:
                    errors[0] += 1
        conn.close()

    before = get_json(url, "/health")
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = get_json(url, "/health")
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    rows = after.get("decode_rows", 0) - before.get("decode_rows", 0)
    lat = sorted(latencies)
    return {
        "clients": clients, "requests": len(lat), "errors": errors[0], "wall_s": wall,
        "req_s": len(lat) / wall, "tok_s": tokens[0] / wall,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
        "mean_batch": rows / steps if steps else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory to serve (default: a random model of --preset)")
    src.add_argument("--url", help="measure an already running server instead")
    ap.add_argument("--preset", default="tiny", help="size of the random model served when --model is not given")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="time cap per concurrency level")
    ap.add_argument("--max-batch-size", type=int, default=16, help="passed to the server it starts")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]

    proc, tmp = None, None
    try:
        if args.url:
            url, model_desc = args.url.rstrip("/"), args.url
        else:
            model_dir = args.model
            if model_dir is None:
                tmp = tempfile.TemporaryDirectory()
                model_dir = random_checkpoint(tmp.name, args.preset)
                model_desc = f"{args.preset} preset, random weights"
            else:
                model_desc = model_dir
            proc, url = start_server(model_dir, args.max_batch_size)
        model = get_json(url, "/v1/models")["data"][0]["id"]
        messages = workload(max(levels) * args.requests_per_client)
        run_level(url, model, messages, 1, 1, args.max_tokens, args.max_seconds)  # warm-up
        results = [run_level(url, model, messages, c, args.requests_per_client, args.max_tokens, args.max_seconds)
                   for c in levels]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()

    print(f"`nanovlm serve` load: {model_desc}; easy-VQA image + question, greedy, max_tokens={args.max_tokens}, "
          f"{args.requests_per_client} requests per client; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| clients | requests | errors | wall s | requests/s | completion tokens/s | p50 latency s | "
          "p95 latency s | mean decode batch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['wall_s']:.2f} | {r['req_s']:.2f} | "
              f"{r['tok_s']:.1f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['mean_batch']:.2f} |")
    base = results[0]["req_s"] if results and results[0]["clients"] == 1 else None
    if base:
        print("\nspeed-up over one client: " + ", ".join(f"{r['clients']} clients x{r['req_s'] / base:.1f}"
                                                          for r in results[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
