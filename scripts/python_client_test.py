#!/usr/bin/env python3
"""End-to-end test with a client generated from proto/ by grpcio-tools (another language than
the server): starts the server binary on free loopback ports, embeds a real HAM10000 image,
segments it by handle and by stream, and checks the Prometheus exposition with promtool when it
is installed (.ci/run installs it).

Usage: scripts/python_client_test.py target/debug/skinsam
"""
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "tests", "fixtures", "images", "ISIC_0024306.jpg")
TRUTH = os.path.join(ROOT, "tests", "fixtures", "images", "ISIC_0024306_segmentation.png")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(out):
    protos = [os.path.join("skinsam", "v1", f) for f in ("common.proto", "models.proto", "embedding.proto", "segmentation.proto")]
    args = ["protoc", "-I" + os.path.join(ROOT, "proto"), "--python_out=" + out, "--grpc_python_out=" + out] + protos
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed")
    sys.path.insert(0, out)


def main():
    binary = os.path.abspath(sys.argv[1])
    gen = tempfile.mkdtemp(prefix="skinsam-py-")
    generate(gen)
    import grpc
    from PIL import Image
    from skinsam.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc, models_pb2, models_pb2_grpc
    from skinsam.v1 import segmentation_pb2, segmentation_pb2_grpc

    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, SKINSAM__GRPC_ADDR=f"127.0.0.1:{grpc_port}", SKINSAM__METRICS_ADDR=f"127.0.0.1:{metrics_port}")
    server = subprocess.Popen([binary, "serve"], cwd=ROOT, env=env)
    passed, failed = 0, 0

    def check(name, cond, detail=""):
        nonlocal passed, failed
        if cond:
            passed += 1
            print(f"ok   {name}")
        else:
            failed += 1
            print(f"FAIL {name} {detail}")

    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        models = models_pb2_grpc.ModelServiceStub(channel)
        deadline = time.time() + 120
        while True:
            try:
                ms = models.ListModels(models_pb2.ListModelsRequest(), timeout=5).models
                if ms and all(m.state == models_pb2.MODEL_STATE_READY for m in ms):
                    break
            except grpc.RpcError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        check("ListModels shows the default model", [m.id for m in ms] == ["skinsam-tiny"], ms)
        image = open(IMAGE, "rb").read()
        emb = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        r = emb.Embed(embedding_pb2.EmbedRequest(model_id="skinsam-tiny", image=image))
        check("Embed returns a handle and the image size", r.embedding_handle and (r.original_width, r.original_height) == (200, 150), r)
        prompt = common_pb2.Prompt(
            points=[common_pb2.Point(x=110, y=71, label=common_pb2.POINT_LABEL_FOREGROUND)],
            box=common_pb2.Box(x0=60, y0=2, x1=169, y1=139),
        )
        seg = segmentation_pb2_grpc.SegmentationServiceStub(channel)
        s = seg.Segment(segmentation_pb2.SegmentRequest(
            model_id="skinsam-tiny", embedding_handle=r.embedding_handle, prompts=[prompt, prompt],
            multimask_output=True, mask_format=segmentation_pb2.MASK_FORMAT_PNG_AND_RLE))
        check("Segment by handle answers per prompt", len(s.masks) == 2 and len(s.masks[0].scores) == 3, s.masks)
        png = Image.open(io.BytesIO(s.masks[0].png))
        check("mask PNG has the image size", png.size == (200, 150), png.size)
        ones_png = sum(1 for v in png.convert("L").tobytes() if v > 127)
        counts = s.masks[0].rle.counts
        ones_rle = sum(counts[1::2])
        check("RLE and PNG agree", ones_png == ones_rle == s.masks[0].area, (ones_png, ones_rle, s.masks[0].area))
        # The default model is trained: its single-mask output (what it was trained on) finds
        # the lesion of this HAM10000 image.
        one = seg.Segment(segmentation_pb2.SegmentRequest(
            model_id="skinsam-tiny", embedding_handle=r.embedding_handle, prompts=[prompt],
            mask_format=segmentation_pb2.MASK_FORMAT_PNG))
        pred = [v > 127 for v in Image.open(io.BytesIO(one.masks[0].png)).convert("L").tobytes()]
        truth = [v > 127 for v in Image.open(TRUTH).convert("L").resize((200, 150), Image.NEAREST).tobytes()]
        inter = sum(1 for p, t in zip(pred, truth) if p and t)
        dice = 2 * inter / max(1, sum(pred) + sum(truth))
        check("the default model segments the lesion (Dice >= 0.85)", dice >= 0.85, dice)
        reqs = [segmentation_pb2.SegmentRequest(model_id="skinsam-tiny", image=image, prompts=[prompt], request_id=f"q{i}") for i in range(4)]
        ids = [x.request_id for x in seg.SegmentStream(iter(reqs))]
        check("SegmentStream keeps order", ids == ["q0", "q1", "q2", "q3"], ids)
        try:
            seg.Segment(segmentation_pb2.SegmentRequest(model_id="nope", image=image, prompts=[prompt]))
            check("unknown model is NOT_FOUND", False)
        except grpc.RpcError as e:
            check("unknown model is NOT_FOUND", e.code() == grpc.StatusCode.NOT_FOUND, e)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        check("metrics expose request latency", "skinsam_request_duration_seconds_bucket" in text)
        # Model ids a client makes up are not label values (one series each would grow without
        # bound): the "nope" call above is counted under model="unknown".
        check("unknown model ids are labelled \"unknown\"", 'model="unknown"' in text and 'model="nope"' not in text)
        promtool = shutil.which("promtool")
        if promtool:
            p = subprocess.run([promtool, "check", "metrics"], input=text, text=True, capture_output=True)
            check("promtool check metrics", p.returncode == 0, p.stdout + p.stderr)
        else:
            print("note: promtool not installed here (apt-get install prometheus); .ci/run installs it")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(gen, ignore_errors=True)
    print(f"python client: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
