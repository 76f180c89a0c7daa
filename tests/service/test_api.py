"""HTTP API against an in-process app (httpx via Starlette's TestClient, lifespan included)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.api.rate_limit import TokenBucket
from service.api.schemas import ClassifyResponse, ErrorResponse

from .conftest import image_bytes, metric_value

PNG = image_bytes("PNG")


def classify(client: TestClient, data: bytes = PNG, params: dict | None = None, headers: dict | None = None):
    headers = {"content-type": "image/png", **(headers or {})}
    return client.post("/classify", params=params, content=data, headers=headers)


def assert_still_serving(client: TestClient) -> None:
    r = classify(client)
    assert r.status_code == 200, r.text


def test_classify_raw_body(client: TestClient) -> None:
    r = classify(client, params={"tier": "fast", "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["tier"] == "fast"
    assert body["schedule"] == "r=6" and body["r_per_block"] == [6, 5]  # second block capped at half of 10
    assert [p["score"] for p in body["top_k"]] == sorted((p["score"] for p in body["top_k"]), reverse=True)
    assert len(body["top_k"]) == 3 and all(0 <= p["index"] < 1000 for p in body["top_k"])
    assert body["top_k"][0]["label"]  # ImageNet description from timm's metadata
    assert body["batch_size"] >= 1
    assert set(body["timings"]) == {"queue_ms", "inference_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"]
    assert r.headers["X-Request-ID"] == body["request_id"]


def test_labels_are_imagenet_descriptions(client: TestClient) -> None:
    from timm.data import ImageNetInfo

    top = classify(client, params={"top_k": 1}).json()["top_k"][0]
    assert top["label"] == ImageNetInfo().index_to_description(top["index"])


def test_default_tier_and_request_id_echo(client: TestClient) -> None:
    r = classify(client, headers={"X-Request-ID": "abc-123"})
    assert r.json()["tier"] == "balanced"
    assert r.headers["X-Request-ID"] == "abc-123" == r.json()["request_id"]


def test_multipart_several_files_keep_order_and_isolate_bad_one(client: TestClient) -> None:
    files = [
        ("file", ("a.png", PNG, "image/png")),
        ("file", ("b.txt", b"not an image", "text/plain")),
        ("file", ("c.jpg", image_bytes("JPEG"), "image/jpeg")),
    ]
    r = client.post("/classify", params={"top_k": 2}, files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", "b.txt", "c.jpg"]
    assert len(results[0]["top_k"]) == 2 and len(results[2]["top_k"]) == 2
    assert results[1]["error"]["code"] == "bad_image" and "top_k" not in results[1]


def test_multipart_single_file_is_flat(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("x.png", PNG, "image/png")})
    assert r.status_code == 200 and "top_k" in r.json() and "results" not in r.json()


def test_same_image_same_answer_in_any_form(client: TestClient) -> None:
    raw = classify(client, params={"tier": "exact"}).json()["top_k"]
    multipart = client.post("/classify?tier=exact", files={"file": ("x.png", PNG, "image/png")}).json()[
        "top_k"
    ]
    assert [p["index"] for p in raw] == [p["index"] for p in multipart]
    assert [p["score"] for p in raw] == pytest.approx([p["score"] for p in multipart], abs=1e-6)


def test_tiers_models_health(client: TestClient) -> None:
    tiers = client.get("/tiers").json()["tiny"]
    assert [t["name"] for t in tiers["tiers"]] == ["exact", "balanced", "fast", "fastest"]
    by_name = {t["name"]: t for t in tiers["tiers"]}
    # 16 patches, 2 blocks: balanced r=round(0.5*16/2)=4, fast r=round(0.8*8)=6, fastest r=8 (all constant)
    assert by_name["balanced"]["r_per_block"] == [4, 4]
    assert by_name["fastest"]["schedule"] == "r=8"
    assert (
        by_name["exact"]["tokens_after_last_block"] == 17 and by_name["fast"]["tokens_after_last_block"] == 6
    )
    assert by_name["exact"]["speedup_vs_exact"] == 1.0
    assert all(t["speedup_vs_exact"] > 0 for t in tiers["tiers"])
    assert by_name["exact"]["gflops"] > by_name["fast"]["gflops"] > 0
    models = client.get("/models").json()
    assert models == [
        {
            "name": "tiny",
            "architecture": "vit_tiny_patch16_224",
            "weights_source": "random (untrained)",
            "random_weights": True,
            "device": "cpu",
            "dtype": "float32",
            "num_classes": 1000,
            "input_size": [3, 64, 64],
            "default": True,
        }
    ]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    assert (
        "multipart/form-data"
        in client.get("/openapi.json").json()["paths"]["/classify"]["post"]["requestBody"]["content"]
    )


def test_openapi_examples_are_valid_responses(client: TestClient) -> None:
    """The examples /docs shows are real response bodies (validated by the response models)."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name, model in (("ClassifyResponse", ClassifyResponse), ("ErrorResponse", ErrorResponse)):
        examples = schemas[name]["examples"]
        assert examples
        for example in examples:
            model.model_validate(example)


def test_metrics_exposed(client: TestClient) -> None:
    classify(client, params={"tier": "fast"})
    text = client.get("/metrics").text
    labels = {"model": "tiny", "tier": "fast"}
    assert metric_value(text, "tome_requests_total", {**labels, "status": "200"}) >= 1
    assert metric_value(text, "tome_images_total", labels) >= 1
    assert metric_value(text, "tome_batch_size_count", labels) >= 1
    assert metric_value(text, "tome_request_duration_seconds_count", labels) >= 1
    assert metric_value(text, "tome_queue_wait_seconds_count", labels) >= 1
    assert metric_value(text, "tome_batch_duration_seconds_count", labels) >= 1
    assert metric_value(text, "tome_tier_info", {**labels, "schedule": "r=6"}) == 1
    assert metric_value(text, "tome_tier_gflops", labels) > 0
    assert "tome_queue_depth" in text and "tome_in_flight_requests" in text
    # CPU and memory of every process of the service, by role (here the engine is this process)
    assert metric_value(text, "tome_process_cpu_seconds_total", {"role": "engine"}) > 0
    assert metric_value(text, "tome_process_resident_memory_bytes", {"role": "engine"}) > 0
    assert metric_value(text, "python_info") == 1
    assert "_created" not in text
    assert "tome_device_memory_bytes{" not in text  # CUDA only


@pytest.mark.parametrize(
    ("send", "status", "reason"),
    [
        (lambda c: classify(c, b""), 422, "bad_image"),
        (lambda c: classify(c, image_bytes("JPEG", size=(300, 200))[:400]), 422, "bad_image"),
        (lambda c: classify(c, b"hello, world"), 415, "bad_image"),
        (lambda c: classify(c, PNG[: len(PNG) // 2]), 422, "bad_image"),
        (
            lambda c: c.post("/classify", content=PNG, headers={"content-type": "text/plain"}),
            415,
            "bad_image",
        ),
        (lambda c: c.post("/classify", files={"file": ("x", b"", "image/png")}), 422, "bad_image"),
        (lambda c: c.post("/classify", files={"other": ("x", PNG, "image/png")}), 422, "bad_request"),
        (lambda c: c.post("/classify", data={"file": "text"}, files={"x": ("x", PNG)}), 422, "bad_request"),
        (lambda c: classify(c, image_bytes("PNG", "L", (2000, 1000))), 422, "too_large"),
        (lambda c: classify(c, b"\0" * 300_000), 413, "too_large"),
        (lambda c: classify(c, params={"tier": "turbo"}), 400, "unknown_tier"),
        (lambda c: classify(c, params={"model": "resnet"}), 404, "unknown_model"),
        (lambda c: classify(c, params={"top_k": 0}), 422, "bad_request"),
        (lambda c: classify(c, params={"top_k": 1001}), 422, "bad_request"),
        (lambda c: classify(c, params={"top_k": "five"}), 422, "bad_request"),
        (lambda c: classify(c, params={"r": 3}), 400, "bad_request"),
        (lambda c: classify(c, headers={"X-Deadline-Ms": "soon"}), 422, "bad_request"),
        (lambda c: c.post("/classify", files=[("file", ("x", PNG))] * 5), 422, "bad_request"),
    ],
    ids=[
        "empty-body",
        "truncated-jpeg",
        "not-an-image",
        "truncated-png",
        "text-content-type",
        "empty-file-part",
        "no-file-part",
        "file-is-text-field",
        "pixel-bomb",
        "body-too-large",
        "unknown-tier",
        "unknown-model",
        "top-k-zero",
        "top-k-too-big",
        "top-k-not-int",
        "raw-r-disabled",
        "bad-deadline-header",
        "too-many-files",
    ],
)
def test_bad_input_is_a_clear_counted_error(client: TestClient, send, status: int, reason: str) -> None:
    before = metric_value(client.get("/metrics").text, "tome_rejections_total", {"reason": reason})
    r = send(client)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == reason and error["message"]
    after = metric_value(client.get("/metrics").text, "tome_rejections_total", {"reason": reason})
    assert after == before + 1
    assert_still_serving(client)


def test_unknown_tier_lists_valid_ones(client: TestClient) -> None:
    assert classify(client, params={"tier": "turbo"}).json()["error"]["valid"] == [
        "exact",
        "balanced",
        "fast",
        "fastest",
        "auto",
    ]


def test_body_limit_enforced_while_streaming_without_content_length(client: TestClient) -> None:
    consumed = 0

    def chunks():
        nonlocal consumed
        for _ in range(100):  # 6.4 MB offered, limit 256 KiB
            consumed += 1
            yield b"\0" * 65536

    r = client.post("/classify", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_still_serving(client)


def test_multipart_over_limit_is_413(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("big.png", b"\0" * 300_000, "image/png")})
    assert r.status_code == 413
    assert_still_serving(client)


def test_raw_r_when_enabled(make_client) -> None:
    c = make_client(models=[{**_tiny(), "allow_raw_r": True}])
    ok = classify(c, params={"r": 5})
    assert ok.status_code == 200 and ok.json()["r_per_block"] == [5, 5] and ok.json()["tier"] == "r5"
    text = c.get("/metrics").text  # a raw tier is described like the configured ones from its first use
    assert metric_value(text, "tome_tier_info", {"tier": "r5", "schedule": "r=5"}) == 1
    assert metric_value(text, "tome_tier_gflops", {"tier": "r5"}) > 0
    assert classify(c, params={"r": 9}).status_code == 422  # at most half of the 16 patches
    assert classify(c, params={"r": -1}).status_code == 422
    assert classify(c, params={"r": 2, "tier": "fast"}).status_code == 400
    assert c.get("/tiers").json()["tiny"]["raw_r_max"] == 8
    unknown = classify(c, params={"tier": "r5"})  # tier names and raw r are apart; the error says both
    assert unknown.status_code == 400 and "raw ?r= from 0 to 8" in unknown.json()["error"]["message"]


def test_configured_tiers_override_defaults(make_client) -> None:
    tiers = {"slow": {"r": 0}, "quick": {"r": [8, 0]}}
    c = make_client(models=[{**_tiny(), "tiers": tiers, "default_tier": "quick"}])
    body = classify(c).json()
    assert body["tier"] == "quick" and body["r_per_block"] == [8, 0]
    assert [t["name"] for t in c.get("/tiers").json()["tiny"]["tiers"]] == ["slow", "quick"]


def _tiny() -> dict:
    from .conftest import TINY_MODEL

    return dict(TINY_MODEL)


def test_failed_batch_is_a_json_500_and_service_recovers(make_client, monkeypatch) -> None:
    c = make_client()
    model = c.engine.models["tiny"].model
    real = type(model).forward
    monkeypatch.setattr(
        type(model), "forward", lambda self, x, r=0: (_ for _ in ()).throw(RuntimeError("oom"))
    )
    r = classify(c)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    monkeypatch.setattr(type(model), "forward", real)
    assert_still_serving(c)
    assert c.fatal_reasons == []  # an ordinary failure: only that batch


def test_sticky_device_error_fails_the_request_and_ends_the_engine(make_client, monkeypatch) -> None:
    """A CUDA error other than out-of-memory leaves the context unusable: the request gets a 500 and the
    engine ends (in production its process exits and the supervisor ends the service)."""
    c = make_client()
    model = c.engine.models["tiny"].model

    def sticky(self, x, r=0):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(type(model), "forward", sticky)
    r = classify(c)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    deadline = time.monotonic() + 5  # the batch's answers go out first, then the engine ends (in its thread)
    while not c.fatal_reasons and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.fatal_reasons and "illegal memory access" in c.fatal_reasons[0]


def test_deadline_passing_in_queue_is_504_and_never_runs(make_client) -> None:
    c = make_client(batching={"max_batch_size": 8, "max_wait_ms": 1000, "max_queue_size": 8})
    text = c.get("/metrics").text
    images_before = metric_value(text, "tome_images_total")
    r = classify(c, headers={"X-Deadline-Ms": "50"})  # alone in its queue: its batch closes after 1 s
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline"
    text = c.get("/metrics").text
    assert metric_value(text, "tome_rejections_total", {"reason": "deadline"}) == 1
    assert classify(c).status_code == 200  # waits out max_wait, then runs alone
    assert metric_value(c.get("/metrics").text, "tome_images_total") == images_before + 1  # the 504 never ran


def test_a_deadline_spent_before_decoding_is_504_without_decoding(client) -> None:
    """A deadline that has passed once the body is in (a tiny X-Deadline-Ms, a slow upload) is answered
    at once: its images are neither decoded nor queued."""
    text = client.get("/metrics").text
    decoded = metric_value(text, "tome_preprocess_seconds_count")
    r = classify(client, headers={"X-Deadline-Ms": "1e-9"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline"
    assert "decoded" in r.json()["error"]["message"]
    assert metric_value(client.get("/metrics").text, "tome_preprocess_seconds_count") == decoded
    assert classify(client).status_code == 200


@pytest.mark.parametrize("fused", [True, False])
def test_fused_resize_setting_picks_the_preprocessing_path(make_client, fused: bool) -> None:
    client = make_client(limits={"fused_resize": fused})
    preprocessor = client.app.state.frontend.models["tiny"].preprocessor
    assert (preprocessor.fused is not None) is fused
    body = image_bytes("PNG", size=(90, 70))
    r = client.post("/classify", content=body, headers={"content-type": "image/png"})
    assert r.status_code == 200


def test_fidelity_monitor_counts_on_an_idle_service(make_client) -> None:
    c = make_client(fidelity={"sample_rate": 1.0})
    for _ in range(5):
        assert classify(c, params={"tier": "fast"}).status_code == 200
    assert classify(c, params={"tier": "exact"}).status_code == 200  # r=0 itself is never shadowed
    deadline = time.monotonic() + 10
    while metric_value(text := c.get("/metrics").text, "tome_shadow_checks_total", {"tier": "fast"}) < 5:
        assert time.monotonic() < deadline, "shadow checks never ran on an idle service"
        time.sleep(0.05)
    labels = {"model": "tiny", "tier": "fast"}
    # the same image every time: the tier's answer and r=0's agree for all five or for none
    assert metric_value(text, "tome_shadow_agreements_total", labels) in (0, 5)
    assert 'tome_shadow_checks_total{model="tiny",tier="exact"}' not in text
    assert metric_value(text, "tome_shadow_dropped_total", labels) == 0


def test_a_full_front_end_sheds_before_fastapi_runs(make_client) -> None:
    """Past ``server.max_requests`` the 503 comes from ``api.shedding`` before routing and parameter
    validation (a bad ``top_k`` would otherwise be a 422), rendered and counted like the route's own."""
    c = make_client(server={"max_requests": 1})
    frontend = c.app.state.frontend
    frontend.in_flight = 1  # as if one upload held the only admission
    try:
        r = c.post(
            "/classify?top_k=not-a-number",
            content=PNG,
            headers={"content-type": "image/png", "X-Request-ID": "shed-1"},
        )
    finally:
        frontend.in_flight = 0
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "overloaded" and r.json()["request_id"] == "shed-1"
    assert r.headers["retry-after"] and r.headers["x-request-id"] == "shed-1"
    text = c.get("/metrics").text
    assert metric_value(text, "tome_requests_total", {"status": "503", "model": "none"}) == 1
    assert metric_value(text, "tome_rejections_total", {"reason": "overloaded"}) == 1
    assert metric_value(text, "tome_requests_total", {"status": "422"}) == 0
    ok = c.post("/classify", content=PNG, headers={"content-type": "image/png"})
    assert ok.status_code == 200, ok.text


def test_an_unexpected_preprocessing_failure_fails_its_image_alone(make_client, monkeypatch) -> None:
    """One image of three raises something no bad input raises (here MemoryError) while a sibling is still
    decoding into its slot: that image gets a 500 of its own, the others are served, the request is a
    counted 200 (it was a bare 500 released the siblings' slots mid-write and counted nothing)."""
    from service.ingest.preprocess import Preprocessor

    into = Preprocessor.into

    def failing_into(self, img, out) -> None:
        if img.size == (91, 71):
            raise MemoryError("simulated")
        if img.size == (92, 72):
            time.sleep(0.3)  # still writing when the other fails
        into(self, img, out)

    monkeypatch.setattr(Preprocessor, "into", failing_into)
    c = make_client()
    sizes = [(91, 71), (92, 72), (80, 60)]
    files = [("file", (f"{i}.png", image_bytes("PNG", size=s), "image/png")) for i, s in enumerate(sizes)]
    r = c.post("/classify", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["error"]["code"] == "internal" and "top_k" not in results[0]
    assert results[1]["top_k"] and results[2]["top_k"]
    alone = c.post("/classify", files=files[:1])
    assert alone.status_code == 500 and alone.json()["error"]["code"] == "internal"
    text = c.get("/metrics").text
    assert metric_value(text, "tome_requests_total", {"status": "200"}) == 1
    assert metric_value(text, "tome_requests_total", {"status": "500"}) == 1
    assert metric_value(text, "tome_rejections_total", {"reason": "internal"}) == 0


def test_an_unexpected_error_is_a_counted_json_500(client, monkeypatch) -> None:
    from service.api.routes import classify

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(classify, "_respond", broken)
    before = metric_value(client.get("/metrics").text, "tome_requests_total", {"status": "500"})
    r = TestClient(client.app, raise_server_exceptions=False).post(
        "/classify", content=PNG, headers={"content-type": "image/png"}
    )
    assert r.status_code == 500
    assert ErrorResponse.model_validate(r.json()).error.code == "internal"
    after = metric_value(client.get("/metrics").text, "tome_requests_total", {"status": "500"})
    assert after == before + 1


def test_a_jpeg_with_too_many_scans_is_a_422_and_the_service_still_answers(make_client) -> None:
    from .test_preprocess import _with_repeated_last_scan

    limits = {
        "max_body_bytes": 256 * 1024,
        "max_files": 4,
        "max_image_pixels": 1_000_000,
        "max_jpeg_scans": 16,
    }
    c = make_client(limits=limits)
    progressive = image_bytes("JPEG", progressive=True)
    many = _with_repeated_last_scan(progressive, 20)
    r = c.post("/classify", content=many, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_image", r.text
    assert c.post("/classify", content=progressive, headers={"content-type": "image/jpeg"}).status_code == 200
    assert metric_value(c.get("/metrics").text, "tome_rejections_total", {"reason": "bad_image"}) == 1


def test_image_headers_are_read_in_a_decode_thread_not_on_the_event_loop(make_client, monkeypatch) -> None:
    """Reading a header is Pillow parsing the file's structure in Python (bounded by its read budget, yet
    ~50 ms for a crafted 8 MB file, and EXIF besides): on the event loop it would hold every connection of
    the front-end, health probes included, for as long."""
    import threading

    from service.ingest.preprocess import Preprocessor

    opened_in = []
    open_header = Preprocessor.open

    def recording_open(self, data):
        opened_in.append(threading.current_thread().name)
        return open_header(self, data)

    monkeypatch.setattr(Preprocessor, "open", recording_open)
    c = make_client(limits={"heavy_image_pixels": 5_000, "max_files": 4})
    files = [
        ("file", (f"{i}.png", image_bytes("PNG", size=s), "image/png"))
        for i, s in enumerate([(80, 60), (90, 70)])
    ]
    r = c.post("/classify", files=files)  # the second is a heavy image: opened in a decode thread too
    assert r.status_code == 200 and all("top_k" in one for one in r.json()["results"]), r.text
    assert len(opened_in) == 2 and all(name.startswith("decode_") for name in opened_in), opened_in


def test_a_multipart_body_cut_before_its_closing_boundary_is_a_422(client: TestClient) -> None:
    """A multipart body that ends before its closing boundary (a wrong Content-Length, a truncating
    proxy) loses its last part in the parser: two images sent, one answered as if only one had been
    (a 200 in the one-image shape), or a single image read as 'no file part'."""

    def part(name: str, data: bytes) -> bytes:
        return (
            b'--BB\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
            b"Content-Type: image/png\r\n\r\n%s\r\n" % (name.encode(), data)
        )

    jpeg = image_bytes("JPEG")
    bodies = {
        "second part cut": part("a.png", PNG) + part("b.jpg", jpeg)[:200],
        "no closing boundary": part("a.png", PNG) + part("b.jpg", jpeg),
        "one part, no closing boundary": part("a.png", PNG),
    }
    headers = {"content-type": "multipart/form-data; boundary=BB"}
    for name, body in bodies.items():
        r = client.post("/classify", content=body, headers=headers)
        assert r.status_code == 422, (name, r.text)
        assert "ends before its closing boundary" in r.json()["error"]["message"], (name, r.text)
    whole = part("a.png", PNG) + part("b.jpg", jpeg) + b"--BB--\r\n"
    r = client.post("/classify", content=whole, headers=headers)
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    epilogue = whole + b"an epilogue, which RFC 2046 allows and parsers ignore\r\n"
    assert client.post("/classify", content=epilogue, headers=headers).status_code == 200


def test_metrics_scrapes_beyond_the_rate_get_429_and_classify_is_unaffected(make_client) -> None:
    """Each /metrics answer reads every process's metric files (~5 ms of the event loop): a flood of
    scrapers starved classify (175 -> 4.5 req/s measured). Past server.max_scrapes_per_s a front-end
    answers 429 + Retry-After, counted, and keeps classifying."""
    c = make_client(server={"max_scrapes_per_s": 3})
    frontend = c.app.state.frontend
    assert frontend.scrapes.rate == 3
    # The same bucket on a clock the test moves: with the real one a slow host refills it mid-test.
    now = [0.0]
    frontend.scrapes = TokenBucket(3, clock=lambda: now[0])
    codes = [c.get("/metrics").status_code for _ in range(6)]
    assert codes == [200, 200, 200, 429, 429, 429], codes
    refused = c.get("/metrics")
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limited"
    assert classify(c).status_code == 200
    now[0] += 1.0  # a second's worth back
    text = c.get("/metrics").text
    assert metric_value(text, "tome_rejections_total", {"reason": "rate_limited"}) == 4


def test_unknown_paths_and_methods_get_our_error_shape_and_are_counted(client) -> None:
    """Starlette's own 404 and 405 render like every other refusal (``error.code``; Allow kept on 405)
    and are counted as rejections, so a scanner probing paths shows on the dashboard."""
    missing = client.get("/no-such-path")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.get("/classify")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]
    text = client.get("/metrics").text
    assert metric_value(text, "tome_rejections_total", {"reason": "not_found"}) >= 1
    assert metric_value(text, "tome_rejections_total", {"reason": "method_not_allowed"}) >= 1


def test_health_probes_answer_head(client) -> None:
    """Uptime checkers and some load balancers probe with HEAD."""
    for path in ("/healthz", "/readyz"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)


def test_every_error_carries_a_sane_request_id(client) -> None:
    """Refusals outside /classify (404, 405, a /metrics 429, ...) carry a request id in the body and the
    X-Request-ID header like classify's: the client's when it is sane, a generated one otherwise (an
    unchecked one was echoed as sent, and none was generated)."""
    for send in (lambda **kw: client.get("/no-such-path", **kw), lambda **kw: client.get("/classify", **kw)):
        generated = send()
        assert generated.json()["request_id"] == generated.headers["X-Request-ID"] != "", generated.text
        echoed = send(headers={"X-Request-ID": "abc-123"})
        assert echoed.json()["request_id"] == echoed.headers["X-Request-ID"] == "abc-123"
        insane = send(headers={"X-Request-ID": "<script> " + "x" * 300})
        assert insane.json()["request_id"] == insane.headers["X-Request-ID"], insane.text
        assert "<" not in insane.json()["request_id"] and len(insane.json()["request_id"]) <= 128


def test_every_rejection_reason_is_exported_at_zero_from_the_start() -> None:
    """rate() and the dashboard's rejections panel need each reason's series before its first refusal:
    Starlette's 404/405 and the /metrics 429 were exported only once they happened."""
    from prometheus_client import CollectorRegistry, generate_latest

    from service.observability.metrics import FrontendMetrics

    registry = CollectorRegistry()
    FrontendMetrics(registry)
    text = generate_latest(registry).decode()
    for reason in ("not_found", "method_not_allowed", "rate_limited", "bad_request", "queue_full", "timeout"):
        assert f'tome_rejections_total{{reason="{reason}"}} 0.0' in text, reason


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
        ("GIF", "image/gif"),
        ("PNG", "application/octet-stream"),
    ],
)
def test_openapi_lists_raw_body_types(client: TestClient, fmt: str, media_type: str) -> None:
    """/docs offers (and schema-driven clients send) only the body types the schema lists: WebP, BMP, GIF
    and octet-stream bodies were taken but not listed."""
    r = client.post("/classify", content=image_bytes(fmt), headers={"content-type": media_type})
    assert r.status_code == 200, r.text
    content = client.get("/openapi.json").json()["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert content[media_type] == {"schema": {"type": "string", "format": "binary"}}


def test_openapi_documents_the_headers_classify_reads_and_sends(client: TestClient) -> None:
    """X-Deadline-Ms and X-Request-ID are read from the request without FastAPI parameters (no validation
    cost per request), so the document lists them itself; the answer's X-Request-ID and a 503's Retry-After
    are documented where they are sent."""
    op = client.get("/openapi.json").json()["paths"]["/classify"]["post"]
    headers = {p["name"]: p for p in op["parameters"] if p["in"] == "header"}
    assert set(headers) == {"X-Deadline-Ms", "X-Request-ID"}
    assert {p["name"] for p in op["parameters"] if p["in"] == "query"} == {"tier", "top_k", "model", "r"}
    assert "X-Request-ID" in op["responses"]["200"]["headers"]
    assert set(op["responses"]["503"]["headers"]) == {"X-Request-ID", "Retry-After"}
    sent = client.post(
        "/classify", content=b"not an image", headers={"content-type": "image/png", "X-Request-ID": "abc-1"}
    )
    assert sent.headers["X-Request-ID"] == "abc-1"
    too_short = client.post(
        "/classify", content=b"x", headers={"content-type": "image/png", "X-Deadline-Ms": "0"}
    )
    assert too_short.status_code == 422 and "X-Deadline-Ms" in too_short.json()["error"]["message"]


def test_openapi_documents_the_statuses_and_types_the_routes_answer_with(client: TestClient) -> None:
    """/metrics is Prometheus text (the schema said JSON) and may be a 429; the probes' 503s; classify's
    408 (a body slower than limits.body_timeout_s)."""
    paths = client.get("/openapi.json").json()["paths"]
    metrics = paths["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert metrics["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    for probe in ("/healthz", "/readyz"):
        assert "503" in paths[probe]["get"]["responses"], probe
    assert "408" in paths["/classify"]["post"]["responses"]
