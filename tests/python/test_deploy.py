"""What deploying the worker rests on: the OCI image (scripts/build-image.sh, deploy/Containerfile)
built and run from its own root filesystem, and the Kubernetes manifests (deploy/kubernetes, with
the InferencePool example in deploy/kubernetes/inference-pool) checked against the pinned
Kubernetes schemas, against each other and against a running worker.

There is no cluster and no kustomize binary here: `render` below applies the few kustomize
features the manifests use (and refuses any other), so the objects checked are the ones
`kubectl apply -k` would send.
"""

from __future__ import annotations

import collections
import copy
import http.client
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
POOL = K8S / "inference-pool"
# The Kubernetes version the manifests are validated for (kubernetes-validate's schemas; the
# preStop `sleep` action needs 1.30 or later).
KUBERNETES_VERSION = "1.33"

# After the drain, the worker gives open streams this long (src/server.rs STREAM_FLUSH), and
# the engine step in progress may still need some seconds: what the grace period adds.
STREAM_FLUSH_S = 5
STEP_MARGIN_S = 10
# What the memory rule adds for the runtime, tokenizer and activations (deployment.yaml).
OVERHEAD_MIB = 256
# The endpoint picker's hashing block floor (llm-d-router: minBlockSizeTokens).
EPP_MIN_BLOCK_TOKENS = 64

# The picker's default metric specs for vLLM, which apply to pods without an engine label
# (llm-d-router v0.10.0, pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go;
# the same in gateway-api-inference-extension v1.5).
EPP_VLLM_METRICS = {
    "queuedRequestsSpec": "vllm:num_requests_waiting",
    "runningRequestsSpec": "vllm:num_requests_running",
    "kvUsageSpec": "vllm:kv_cache_usage_perc",
    "loraSpec": "vllm:lora_requests_info",
    "cacheInfoSpec": "vllm:cache_config_info",
}
# Not served: the worker has no LoRA adapters; the picker reads a missing family as none.
NOT_SERVED = {"vllm:lora_requests_info"}

LISTENING = re.compile(r"listening on http://([0-9.]+):(\d+)")


# ---------------------------------------------------------------------------------------------
# kustomize, the part the manifests use


KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "secretGenerator",
    "configMapGenerator",
    "images",
}


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(directory: Path) -> tuple[list, dict]:
    """The objects `kubectl apply -k directory` makes, and the generated objects' names (a
    fixed suffix stands for kustomize's content hash)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: kustomize fields this test does not apply: {unknown}"
    objects, generated = [], {}
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            sub_objects, sub_generated = render(path)
            objects += sub_objects
            generated.update(sub_generated)
        else:
            objects += load_yaml(path)
    for kind, field in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
        for gen in k.get(field, []):
            assert set(gen) <= {"name", "files"}, f"{field} {gen['name']}: only files are applied"
            data = {}
            for spec in gen["files"]:
                key, _, source = spec.partition("=")
                source = directory / (source or key)
                if kind == "Secret" and not source.exists():
                    # The key file each cluster makes (git ignores it): a stand-in.
                    text = "default " + "0123456789abcdef" * 4 + "\n"
                else:
                    text = source.read_text()
                data[key] = text
            name = gen["name"] + "-h4sh"
            generated[gen["name"]] = name
            obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
            obj["stringData" if kind == "Secret" else "data"] = data
            objects.append(obj)
    for obj in objects:
        spec = pod_spec(obj) or {}
        for c in spec.get("containers", []):
            for image in k.get("images", []):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                volume["secret"]["secretName"] = generated.get(
                    volume["secret"]["secretName"], volume["secret"]["secretName"]
                )
            if "configMap" in volume:
                volume["configMap"]["name"] = generated.get(
                    volume["configMap"]["name"], volume["configMap"]["name"]
                )
    return objects, generated


def pod_spec(obj: dict):
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


@pytest.fixture(scope="module")
def base():
    return render(K8S)


@pytest.fixture(scope="module")
def pool():
    return render(POOL)


def find(objects, kind, name=None):
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def workload(base):
    deployment = find(base[0], "Deployment", "llm-worker-rbee")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return deployment, container, env


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    assert m, f"not a duration: {text}"
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


def container_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


# ---------------------------------------------------------------------------------------------
# The manifests


def test_every_manifest_is_in_its_kustomization():
    for directory in (K8S, POOL):
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        listed = {r for r in k["resources"] if not (directory / r).is_dir()}
        sources = {
            spec.partition("=")[2] or spec.partition("=")[0]
            for field in ("secretGenerator", "configMapGenerator")
            for gen in k.get(field, [])
            for spec in gen["files"]
        }
        present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"} - sources
        assert listed == present, f"{directory}: listed {sorted(listed)}, present {sorted(present)}"


def strict(schema):
    """A CRD schema as the API server would apply it, plus what it prunes silently: unknown
    fields, which are refused here (as kubernetes-validate's strict mode does)."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if isinstance(s, dict):
            if "properties" in s and "additionalProperties" not in s:
                s["additionalProperties"] = False
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)

    walk(schema)
    schema.pop("$comment", None)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def check_http_route(route, pool_names):
    """HTTPRoute (Gateway API v1) has no schema here: the fields this example relies on."""
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    spec = route["spec"]
    assert set(spec) <= {"parentRefs", "hostnames", "rules"}
    for parent in spec["parentRefs"]:
        assert parent["name"] and parent.get("kind", "Gateway") == "Gateway"
    for rule in spec["rules"]:
        assert set(rule) <= {"matches", "backendRefs", "timeouts", "filters", "name"}
        for ref in rule["backendRefs"]:
            assert (ref["group"], ref["kind"]) == ("inference.networking.k8s.io", "InferencePool")
            assert ref["name"] in pool_names
        for timeout in rule.get("timeouts", {}).values():
            assert re.fullmatch(r"\d+(h|m|s|ms)", timeout), timeout


def test_manifests_validate_against_the_kubernetes_schemas(pool):
    objects, _ = pool  # the pool's kustomization includes the base
    kinds = {o["kind"] for o in objects}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
        "Secret",
        "ConfigMap",
        "InferencePool",
        "HTTPRoute",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    } <= kinds
    pool_schema = strict(json.loads((POOL / "schema" / "inferencepool-v1.json").read_text()))
    pool_names = {o["metadata"]["name"] for o in objects if o["kind"] == "InferencePool"}
    for obj in objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "InferencePool":
            assert obj["apiVersion"] == "inference.networking.k8s.io/v1"
            jsonschema.validate(obj, pool_schema)
        elif obj["kind"] == "HTTPRoute":
            check_http_route(obj, pool_names)
        else:
            # Strict: unknown fields are errors. Any other custom kind has no schema there and
            # fails here rather than pass unchecked.
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                pytest.fail(f"{what}: {e.message}")


def test_probes_tolerate_the_load_and_a_busy_worker(workload, worker):
    _, container, env = workload
    port = int(env["LLM_WORKER_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert container_port(container, get["port"]) == port, probe
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    # The worker gives up on a load past LLM_WORKER_LOAD_TIMEOUT and says why; the kubelet
    # must not kill it first.
    assert budget > seconds(env["LLM_WORKER_LOAD_TIMEOUT"])
    load_s = metric_samples(fetch(worker.base_url + "/metrics"))["rbee_worker_model_load_seconds"]
    assert budget > 10 * load_s
    liveness = container["livenessProbe"]
    # /health is 503 while draining: liveness must not kill a worker within its grace period.
    grace = workload[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= max(60, grace)
    assert liveness["timeoutSeconds"] >= 5

    # What the liveness probe rests on: /health answers 200 at once while a generation runs.
    busy = threading.Event()
    stop = threading.Event()

    def generate():
        conn = http.client.HTTPConnection(worker.base_url.removeprefix("http://"), timeout=60)
        body = json.dumps(
            {
                "model": served_model(worker),
                "prompt": "Once upon a time",
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            }
        )
        conn.request(
            "POST",
            "/v1/completions",
            body,
            {"Authorization": f"Bearer {worker.token}", "Content-Type": "application/json"},
        )
        r = conn.getresponse()
        while not stop.is_set() and r.read(64):
            busy.set()
        conn.close()  # a client that goes away cancels its job

    t = threading.Thread(target=generate, daemon=True)
    t.start()
    try:
        assert busy.wait(30), "the generation did not start"
        slowest, busy_seen = 0.0, False
        for _ in range(20):
            start = time.monotonic()
            with urllib.request.urlopen(
                worker.base_url + "/health", timeout=liveness["timeoutSeconds"]
            ) as r:
                assert r.status == 200
                health = json.load(r)
            slowest = max(slowest, time.monotonic() - start)
            busy_seen |= health["slots_busy"] >= 1
            time.sleep(0.02)
        assert busy_seen, "no /health answer saw the generation"
        # The probe's own criterion (urlopen's timeout enforces it too); typically milliseconds.
        assert (
            slowest < liveness["timeoutSeconds"]
        ), f"/health took {slowest:.2f}s during a generation"
    finally:
        stop.set()
        t.join(30)


def test_grace_period_covers_the_drain(base, workload):
    deployment, container, env = workload
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = seconds(env["LLM_WORKER_DRAIN_TIMEOUT"])
    assert grace >= pre_stop + drain + STREAM_FLUSH_S + STEP_MARGIN_S
    # A disruption takes one worker at a time, and a rollout keeps the old ones serving until
    # the new one has loaded.
    pdb = find(base[0], "PodDisruptionBudget", "llm-worker-rbee")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_scrape_annotations_name_the_port_and_public_metrics(workload, worker):
    deployment, container, env = workload
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(env["LLM_WORKER_PORT"])
    assert int(annotations["prometheus.io/port"]) in [
        p["containerPort"] for p in container["ports"]
    ]
    assert annotations["prometheus.io/path"] == "/metrics"
    # Prometheus (and the endpoint picker) send no token: /metrics must stay public.
    assert env.get("LLM_WORKER_METRICS_AUTH", "false") == "false"
    with urllib.request.urlopen(worker.base_url + "/metrics", timeout=10) as r:
        assert r.status == 200


def test_the_token_secret_is_mounted_where_the_environment_says(base, workload):
    objects, generated = base
    deployment, container, env = workload
    spec = deployment["spec"]["template"]["spec"]
    path = Path(env["LLM_WORKER_API_TOKEN_FILE"])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    secret = find(objects, "Secret", volume["secret"]["secretName"])
    assert volume["secret"]["secretName"] == generated["llm-worker-rbee-tokens"]
    assert path.name in secret["stringData"]
    # Readable by the worker's user through its group only.
    assert volume["secret"]["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    # The model volume too is read-only, at the directory LLM_WORKER_MODEL is in.
    model = next(
        m
        for m in container["volumeMounts"]
        if Path(m["mountPath"]) == Path(env["LLM_WORKER_MODEL"]).parent
    )
    assert model["readOnly"] is True


# ---------------------------------------------------------------------------------------------
# Resources from the model


def gguf_metadata(path: Path) -> dict:
    """The scalar and string metadata of a GGUF file (arrays skipped)."""
    scalars = {
        0: "<B",
        1: "<b",
        2: "<H",
        3: "<h",
        4: "<I",
        5: "<i",
        6: "<f",
        7: "<?",
        10: "<Q",
        11: "<q",
        12: "<d",
    }
    out = {}
    with open(path, "rb") as f:

        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind):
            if kind in scalars:
                return read(scalars[kind])
            if kind == 8:
                return string()
            assert kind == 9, kind
            item, n = read("<I"), read("<Q")
            if item in scalars:
                f.seek(n * struct.calcsize(scalars[item]), 1)
            else:
                for _ in range(n):
                    value(item)
            return None

        assert f.read(4) == b"GGUF"
        read("<I")  # version
        read("<Q")  # tensors
        for _ in range(read("<Q")):
            key = string()
            out[key] = value(read("<I"))
    return out


def kv_bytes_per_position(model: Path) -> int:
    """On the CPU the KV cache is f16: K and V, per layer, per KV head, per head dimension."""
    meta = gguf_metadata(model)
    arch = meta["general.architecture"]
    heads = meta[f"{arch}.attention.head_count"]
    head_dim = meta.get(f"{arch}.attention.key_length") or meta[f"{arch}.embedding_length"] // heads
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    return 2 * meta[f"{arch}.block_count"] * kv_heads * head_dim * 2


@pytest.fixture(scope="module")
def example_model():
    """The model deployment.yaml is sized for: the default model."""
    given = os.environ.get("LLM_WORKER_MODEL", "")
    if Path(given).name == "SmolLM2-135M-Instruct.Q4_1.gguf":
        return Path(given)
    out = subprocess.run(
        [str(REPO / "scripts" / "fetch-default-model.sh")],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", q)
    assert m, q
    return int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m.group(2)]


def test_resources_follow_the_memory_rule(workload, example_model, pool):
    _, container, env = workload
    per_position = kv_bytes_per_position(example_model)
    assert per_position == 23040  # the number deployment.yaml's comment works with
    parallel, ctx = int(env["LLM_WORKER_PARALLEL"]), int(env["LLM_WORKER_CTX_SIZE"])
    cache_ram = int(env["LLM_WORKER_CACHE_RAM"]) << 20
    kv_mem = int(env["LLM_WORKER_KV_CACHE_MEM"]) << 20
    # All KV (running and cached) is within LLM_WORKER_KV_CACHE_MEM; here every slot can fill
    # its context beside a full prefix cache, and one request always fits.
    assert kv_mem >= parallel * ctx * per_position + cache_ram
    need = example_model.stat().st_size + kv_mem + (OVERHEAD_MIB << 20)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert quantity_bytes(requests["memory"]) == quantity_bytes(limits["memory"]) >= need
    assert int(requests["cpu"]) == int(env["LLM_WORKER_THREADS"])
    assert "cpu" not in limits
    # The picker's prefix index, sized to the same cache (epp-config.yaml).
    config = yaml.safe_load((POOL / "epp-config.yaml").read_text())
    producer = next(p for p in config["plugins"] if p["type"] == "approx-prefix-cache-producer")
    params = producer["parameters"]
    positions = kv_mem / per_position
    assert params["autoTune"] is False
    assert params["blockSizeTokens"] >= EPP_MIN_BLOCK_TOKENS
    assert params["lruCapacityPerServer"] == round(positions / params["blockSizeTokens"])


# ---------------------------------------------------------------------------------------------
# The InferencePool and its endpoint picker


def fetch(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return r.read().decode()


def metric_families(text: str) -> dict:
    """Prometheus text format → {family: {"type": ..., "samples": [(labels, value)]}}."""
    families = collections.defaultdict(lambda: {"type": None, "samples": []})
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families[name]["type"] = kind
        elif line and not line.startswith("#"):
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            assert m, line
            labels = dict(
                re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or "")
            )
            families[m.group(1)]["samples"].append((labels, float(m.group(3))))
    return families


def metric_samples(text: str) -> dict:
    return {name: f["samples"][0][1] for name, f in metric_families(text).items() if f["samples"]}


def served_model(worker) -> str:
    return json.loads(fetch(worker.base_url + "/v1/models", worker.token))["data"][0]["id"]


def test_the_pool_selects_the_workers_and_its_picker(pool):
    objects, generated = pool
    workers = find(objects, "Deployment", "llm-worker-rbee")
    picker = find(objects, "Deployment", "llm-worker-rbee-epp")
    pool_obj = find(objects, "InferencePool", "llm-worker-rbee")
    selector = pool_obj["spec"]["selector"]["matchLabels"]
    labels = workers["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert not selector.items() <= picker["spec"]["template"]["metadata"]["labels"].items()
    container = workers["spec"]["template"]["spec"]["containers"][0]
    # The picker scrapes /metrics on the first target port: the worker's HTTP port.
    assert pool_obj["spec"]["targetPorts"][0]["number"] == container_port(container, "http")
    ref = pool_obj["spec"]["endpointPickerRef"]
    service = find(objects, "Service", ref["name"])
    assert (
        service["spec"]["selector"].items()
        <= picker["spec"]["template"]["metadata"]["labels"].items()
    )
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    epp = picker["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in epp["args"])
    assert container_port(epp, service_port["targetPort"]) == int(args["grpc-port"])
    assert args["pool-name"] == pool_obj["metadata"]["name"]
    assert args["pool-group"] == "inference.networking.k8s.io"
    # Its configuration is the generated ConfigMap, mounted where --config-file reads.
    volume = picker["spec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == generated["llm-worker-rbee-epp"]
    mount = epp["volumeMounts"][0]
    assert Path(args["config-file"]) == Path(mount["mountPath"]) / "epp-config.yaml"
    # The picker reads the pool and its pods.
    role = find(objects, "Role", "llm-worker-rbee-epp")
    readable = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert {("inference.networking.k8s.io", "inferencepools"), ("", "pods")} <= readable


def test_the_picker_reads_metrics_the_worker_serves(worker):
    config = yaml.safe_load((POOL / "epp-config.yaml").read_text())
    assert config["apiVersion"] in ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
    assert config["kind"] == "EndpointPickerConfig"
    # No engine mapping: the picker's vLLM defaults apply (a core-metrics-extractor entry with
    # engineConfigs, or a data layer section, would replace them).
    assert not any(
        p["type"] in ("core-metrics-extractor", "metrics-data-source") for p in config["plugins"]
    )
    assert "dataLayer" not in config and "data" not in config
    refs = {p.get("name", p["type"]) for p in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= refs

    families = metric_families(fetch(worker.base_url + "/metrics"))  # no token, as the picker
    for spec, name in EPP_VLLM_METRICS.items():
        if name in NOT_SERVED:
            assert name not in families, f"{name} is served now: update NOT_SERVED and the config"
            continue
        assert families[name]["type"] == "gauge", name
        assert families[name]["samples"], name
    kv = families["vllm:kv_cache_usage_perc"]["samples"][0][1]
    assert 0.0 <= kv <= 1.0
    ((labels, _),) = families["vllm:cache_config_info"]["samples"]
    # The default model runs on the CPU path, whose KV caches are blocks of 64 positions.
    assert labels["block_size"] == "64" and int(labels["num_gpu_blocks"]) >= 1
    # Every vllm:* name the configuration's comments cite is served, or said not to be.
    cited = set(re.findall(r"vllm:[a-z_]+", (POOL / "epp-config.yaml").read_text()))
    assert cited >= set(EPP_VLLM_METRICS.values())
    assert cited - NOT_SERVED <= set(families)


# ---------------------------------------------------------------------------------------------
# The image


def unpack_oci(layout: Path, rootfs: Path) -> dict:
    """Unpacks an OCI image layout's only image into rootfs, layer by layer; returns its config."""

    def blob(digest):
        return layout / "blobs" / digest.replace(":", "/")

    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    manifest = json.loads(blob(entry["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    for layer in manifest["layers"]:
        assert layer["mediaType"].endswith("tar+gzip") or layer["mediaType"].endswith(".tar")
        with tarfile.open(blob(layer["digest"])) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if name.name.startswith(".wh."):  # a whiteout: the lower layers' file is gone
                    target = rootfs / name.parent / name.name.removeprefix(".wh.")
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok=True)
                    continue
                # Owners and modes as stored (the user's home is 65532's); our own image.
                extra = (
                    {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
                )
                tar.extract(member, rootfs, set_attrs=True, numeric_owner=True, **extra)
    return config


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The image built from the binary under test (LLM_WORKER_BIN, the debug build in CI), in a
    containers-storage of its own, exported as an OCI layout and unpacked."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(
                "the image tests need root (buildah, chroot, mount namespaces); CI runs as root"
            )
        pytest.skip("the image tests need root (buildah, chroot, mount namespaces)")
    binary = os.environ.get("LLM_WORKER_BIN")
    assert binary, "LLM_WORKER_BIN is not set: run scripts/test-python.sh"
    work = tmp_path_factory.mktemp("image")
    start = time.monotonic()
    built = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "build-image.sh"),
            "--bin",
            binary,
            "--tag",
            "localhost/llm-worker-rbee:test",
            "--root",
            str(work / "buildah"),
            "--output",
            str(work / "oci"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    build_s = time.monotonic() - start
    size = built.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"image localhost/llm-worker-rbee:test \(cpu\): [\d.]+ [kMG]B", size), size
    rootfs = work / "rootfs"
    rootfs.mkdir()
    config = unpack_oci(work / "oci", rootfs)
    print(f"\n{size}, built in {build_s:.1f}s")
    yield rootfs, config, built.stderr
    subprocess.run(
        [
            "buildah",
            "--root",
            str(work / "buildah" / "storage"),
            "--runroot",
            str(work / "buildah" / "run"),
            "--storage-driver",
            "vfs",
            "rmi",
            "--all",
        ],
        capture_output=True,
    )
    shutil.rmtree(work, ignore_errors=True)


def test_the_image_holds_the_binary_its_libraries_and_a_user(image):
    rootfs, config, _ = image
    c = config["config"]
    assert c["User"] == "65532:65532"
    assert c["Entrypoint"] == ["/usr/local/bin/llm-worker-rbee"]
    assert c["StopSignal"] == "SIGTERM"
    env = dict(e.split("=", 1) for e in c["Env"])
    assert env["LLM_WORKER_HOST"] == "0.0.0.0" and env["LLM_WORKER_PORT"] == "8080"
    assert env["LLM_WORKER_MODEL"] == "/models/model.gguf"
    assert env["LLM_WORKER_API_TOKEN_FILE"] == "/run/secrets/rbee/tokens"
    assert "rbee:x:65532:65532:" in (rootfs / "etc/passwd").read_text()
    assert "rbee:x:65532:" in (rootfs / "etc/group").read_text()
    assert (rootfs / "home/rbee").stat().st_uid == 65532
    # Nothing but the binary, the libraries ldd names for it, passwd and group.
    files = {
        "/" + str(p.relative_to(rootfs)) for p in rootfs.rglob("*") if p.is_file() or p.is_symlink()
    }
    ldd = subprocess.run(
        ["ldd", os.environ["LLM_WORKER_BIN"]], capture_output=True, text=True, check=True
    )
    libs = {m.group(1) for m in re.finditer(r"(/\S+) \(0x", ldd.stdout)}
    assert files == {"/usr/local/bin/llm-worker-rbee", "/etc/passwd", "/etc/group"} | libs
    # The same tree the Kubernetes manifests expect: the Deployment's user is the image's.
    deployment = find(render(K8S)[0], "Deployment", "llm-worker-rbee")
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == c["User"]


class Contained:
    """The image's entrypoint run from its root filesystem as the container runtime would:
    its environment only, its user, PID 1 of a new PID namespace, the root read-only, the model
    and the key file bind-mounted read-only where the manifests mount them."""

    def __init__(self, rootfs: Path, config: dict, model: Path, secrets: Path, env: dict):
        self.log = collections.deque(maxlen=300)
        c = config["config"]
        environment = dict(e.split("=", 1) for e in c["Env"]) | env
        user = c["User"]
        for d in ("proc", "models", "run/secrets/rbee"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        (rootfs / "models/model.gguf").touch()
        script = (
            'set -e; R="$1"; mount --bind "$R" "$R"; mount -o remount,bind,ro "$R"; '
            'mount --bind -o ro "$2" "$R/models/model.gguf"; '
            'mount --bind -o ro "$3" "$R/run/secrets/rbee"; '
            'mount -t proc proc "$R/proc"; '
            f'exec chroot --userspec={user} "$R" "$4"'
        )
        # --kill-child: the worker goes with unshare, should the test kill it.
        unshare = ["unshare", "--mount", "--pid", "--fork", "--kill-child"]
        args = [str(rootfs), str(model), str(secrets), c["Entrypoint"][0]]
        self.process = subprocess.Popen(
            unshare + ["sh", "-c", script, "sh"] + args,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.port = None
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log.append(line)
            m = LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(2))
                self.listening.set()
        self.listening.set()

    def tail(self):
        return "\n".join(self.log)

    def worker_pid(self) -> int:
        """The worker's PID in this machine's namespace: unshare's one child."""
        children = (
            Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        )
        assert len(children) == 1, children
        return int(children[0])

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def request(url: str, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_the_image_runs_as_a_container_would(image, example_model, tmp_path):
    rootfs, config, _ = image
    entry = config["config"]["Entrypoint"][0]
    user = config["config"]["User"]
    started = time.monotonic()

    # The loader and libraries in the image are enough.
    r = subprocess.run(
        [shutil.which("chroot"), f"--userspec={user}", str(rootfs), entry, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={},
    )
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "--api-token-file" in r.stdout

    model = Path(os.environ.get("LLM_WORKER_MODEL") or example_model)
    token = "test-" + os.urandom(16).hex()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    tokens = secrets / "tokens"
    tokens.write_text(f"default {token}\n")
    # As Kubernetes writes a Secret's file: root's, readable by the fsGroup.
    os.chown(tokens, 0, 65532)
    tokens.chmod(0o440)

    # Without its key file the image refuses to start, saying why.
    empty = tmp_path / "no-secrets"
    empty.mkdir()
    refused = Contained(rootfs, config, model, empty, {})
    try:
        assert refused.process.wait(30) != 0
        refused.listening.wait(5)
        assert "/run/secrets/rbee/tokens" in refused.tail(), refused.tail()
    finally:
        refused.stop()

    # LLM_WORKER_PORT=0: any free port (the host's network is shared here; 8080 may be taken).
    # A small prefix cache: its default is a quarter of this machine's memory.
    run = Contained(
        rootfs, config, model, secrets, {"LLM_WORKER_PORT": "0", "LLM_WORKER_CACHE_RAM": "64"}
    )
    try:
        assert run.listening.wait(120) and run.port, "no port:\n" + run.tail()
        pid = run.worker_pid()
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^NSpid:\s+\d+\s+1$", status, re.M), "the worker is not PID 1"
        assert re.search(r"^Uid:\s+65532\s", status, re.M)
        base = f"http://127.0.0.1:{run.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                code, health = request(base + "/health")
            except OSError:
                code, health = None, None
            if code == 200:
                break
            assert run.process.poll() is None and time.monotonic() < deadline, run.tail()
            time.sleep(0.2)
        assert health["status"] == "ok"

        assert request(base + "/v1/models")[0] == 401
        code, models = request(base + "/v1/models", token=token)
        assert code == 200, models
        name = models["data"][0]["id"]
        code, answer = request(
            base + "/v1/completions",
            {
                "model": name,
                "prompt": "The capital of France is",
                "max_tokens": 8,
                "temperature": 0,
            },
            token=token,
        )
        assert code == 200, answer
        assert answer["choices"][0]["text"]
        assert 0 < answer["usage"]["completion_tokens"] <= 8

        # SIGTERM to PID 1 (what `podman stop` and the kubelet send): its own handler drains
        # and it exits 0.
        os.kill(pid, signal.SIGTERM)
        image_env = dict(e.split("=", 1) for e in config["config"]["Env"])
        drain = seconds(image_env["LLM_WORKER_DRAIN_TIMEOUT"])
        assert run.process.wait(drain + STREAM_FLUSH_S + STEP_MARGIN_S) == 0, run.tail()
        run.listening.wait(5)
        assert re.search(r"INFO .*: stopped$", run.tail(), re.M), run.tail()
    finally:
        run.stop()
    elapsed = time.monotonic() - started
    print(
        f"\nran the image: --help, a refused start, a start, a completion, a stop: {elapsed:.1f}s"
    )
    assert elapsed < 90
