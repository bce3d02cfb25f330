"""The rehearsal of a first real run (full/rehearse.py) and what it checks: the memory plan's per-GPU batches and
refusals in the launcher (full/launch.py, full/defaults.py), several processes in accelerate's CPU mode, the
downloads, the synthetic data in Pick-a-Pic v2's layout and its memory.

Fast: the launcher's decisions from the generated plan table, the downloads from the shipped configs, the data
layout, the CPU-mode refusals. Slow (-m slow): the data's memory at 10k vs 100k rows (two processes), and
`python -m full.launch SETTING --rehearse` for every shipped setting (one update at depth 1 on the CPU, one at a
time: 0.5-13 minutes and 4-19 GB of RAM each, benchmarks/results/rehearsal.md)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from full import defaults, launch, rehearse
from full.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PICKAPIC_V2_COLUMNS = ["are_different", "best_image_uid", "caption", "created_at", "has_label", "image_0_uid",
                       "image_0_url", "image_1_uid", "image_1_url", "jpg_0", "jpg_1", "label_0", "label_1", "model_0",
                       "model_1", "ranking_id", "user_id", "num_example_per_prompt", "__index_level_0__"]


def suggested_commands(message: str) -> list[list[str]]:
    """The `python -m full.launch ...` commands a refusal names, as argv lists after the setting's name."""
    return [line.split("python -m full.launch ", 1)[1].split() for line in message.splitlines()
            if "python -m full.launch " in line]


def accepted(argv: list[str]) -> list[str]:
    """Run a suggested launcher command through launch.command (as on a machine with CUDA)."""
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    head = argv[:argv.index("--")] if "--" in argv else argv
    name, opts = head[0], dict(zip(head[1::2], head[2::2]))
    return launch.command(name, int(opts.get("--num-processes", 1)), extra=extra,
                          gpu_memory=float(opts.get("--gpu-memory", 80)), cuda=True)


# --------------------------------------------------------------------------------------------- memory: the launcher
def test_flux_schnell_at_24gb_on_one_gpu_is_refused_naming_settings_that_fit():
    """Issue item 4: the plan puts PSO online on FLUX.1-schnell at ~40 GiB per GPU; one 24 GB card is refused, and
    every setting the refusal names is one the launcher accepts (the smallest card for one GPU, for 8 under FSDP)."""
    peak = defaults.planned_peak("pso-online-flux-schnell", 1, 1)
    assert not defaults.fits(peak, 24) and peak > 30
    with pytest.raises(launch.DoesNotFit, match=r"pso-online-flux-schnell does not fit one 24 GB GPU") as e:
        launch.command("pso-online-flux-schnell", 1, gpu_memory=24, cuda=True)
    named = suggested_commands(str(e.value))
    assert named and all(accepted(argv) for argv in named)
    cards = {int(float(dict(zip(a[1::2], a[2::2]))["--gpu-memory"])): int(dict(zip(a[1::2], a[2::2])).get(
        "--num-processes", 1)) for a in named}
    smallest_one = min(c for c in defaults.CARDS if defaults.fits(peak, c))
    assert cards.get(smallest_one) == 1  # the smallest single card that fits
    assert any(n == 8 for n in cards.values())  # and FSDP over 8 GPUs of the smallest card that fits there
    with pytest.raises(launch.DoesNotFit):  # the command line too: exit 2 with the message, nothing launched
        launch.per_process_batch("pso-online-flux-schnell", 1, 24)


def test_dipp_sd35_large_turbo_at_80gb_takes_the_largest_batch_the_plan_fits():
    """Issue item 4: at 80 GB the per-GPU batch is the plan's, not an SDXL estimate: a batch whose planned peak
    does not fit (4, ~86 GiB) is never picked, and a --batch the plan says does not fit is refused."""
    name = "dipp-sd35-large-turbo"
    micro, steps = launch.per_process_batch(name, 1, 80)
    assert defaults.fits(defaults.planned_peak(name, micro, 1), 80)
    assert not defaults.fits(defaults.planned_peak(name, 4, 1), 80) and micro < 4
    assert micro * steps == launch.SETTINGS[name].batch
    with pytest.raises(launch.DoesNotFit, match=r"per-GPU batch"):
        launch.command(name, 1, extra=["--batch", "4"], gpu_memory=80, cuda=True)


@pytest.mark.parametrize("name", ["sharpening-sft-sdxl", "sharpening-rlhf-sdxl", "sharpening-rlhf-sd35-medium"])
def test_sharpening_full_finetune_at_24gb_is_refused_and_its_lora_fits(name):
    """Issue item 4: the full fine-tuning settings need 50-58 GiB by the plan: refused at 24 GB, with the LoRA
    alternative (-- --no-full-finetune) on the smallest card it fits (24 GB, or 40 GB for RLHF on SDXL), which the
    launcher then accepts at the LoRA rows' batch."""
    assert not defaults.fits(defaults.planned_peak(name, 1, 1), 24)
    with pytest.raises(launch.DoesNotFit) as e:
        launch.command(name, 1, gpu_memory=24, cuda=True)
    lora = [a for a in suggested_commands(str(e.value)) if "--no-full-finetune" in a]
    assert len(lora) == 1
    card = float(lora[0][lora[0].index("--gpu-memory") + 1])
    assert card == min(c for c in defaults.CARDS if defaults.fits(defaults.planned_peak(name, 1, 1, "lora"), c))
    cmd = accepted(lora[0])
    b = int(cmd[cmd.index("--batch") + 1])
    assert b == defaults.planned_batch(name, card, 1, launch.SETTINGS[name].batch, "lora") and "--full-finetune" in cmd
    assert cmd.index("--no-full-finetune") > cmd.index("--full-finetune")  # the later flag wins in argparse


def test_docs_first_one_gpu_command_is_one_the_launcher_and_rehearsal_accept():
    doc = (ROOT / "docs" / "full.md").read_text()
    first = re.search(r"^python -m full\.launch (\S+)([^\n#]*)", doc, re.M)
    argv = [first.group(1), *first.group(2).split()]
    assert "--rehearse" in argv or "--gpu-memory" in argv
    argv = [a for a in argv if a != "--rehearse"]
    assert accepted(argv)


# --------------------------------------------------------------------------------------------- several processes
def test_several_processes_under_accelerates_cpu_mode_are_refused_with_torchrun_advice(monkeypatch):
    with pytest.raises(ValueError, match=r"2 processes requested.*--launcher torchrun"):
        launch.command("sharpening-rlhf-sdxl", 2, "accelerate", extra=["--batch", "1"], cuda=False)
    assert launch.command("sharpening-rlhf-sdxl", 2, "torchrun", extra=["--batch", "1"], cuda=False)[0] == "torchrun"

    class One:
        num_processes = 1

    for k in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU", launch.PROCESSES_ENV):
        monkeypatch.delenv(k, raising=False)
    launch.check_processes(One())  # nothing asked: fine
    monkeypatch.setenv(launch.PROCESSES_ENV, "2")
    with pytest.raises(RuntimeError, match=r"2 processes were requested .* 1 started.*torchrun"):
        launch.check_processes(One())
    monkeypatch.delenv(launch.PROCESSES_ENV)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # accelerate's simple launcher with --num_processes > 1
    with pytest.raises(RuntimeError, match=r"several processes but started one.*torchrun"):
        launch.check_processes(One())


def test_accelerate_launch_cpu_with_two_processes_stops_at_run_start(tmp_path):
    """The real thing: `accelerate launch --cpu --num_processes 2` starts one process; the run says so and stops."""
    script = tmp_path / "start.py"
    script.write_text("from accelerate import Accelerator\nfrom full.launch import check_processes\n"
                      "check_processes(Accelerator(cpu=True))\nprint('started')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(script)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "several processes but started one" in p.stderr and "started" not in p.stdout


# --------------------------------------------------------------------------------------------- downloads
def test_downloads_are_counted_from_the_configs_in_the_weight_files_dtype():
    flux = {(r["source"], r["part"]): r for r in rehearse.downloads(load_spec(str(launch.SPECS / "flux_schnell.json")),
                                                                     "pso.py")}
    t = flux[("black-forest-labs/FLUX.1-schnell", "transformer")]
    assert t["parameters"] == 11_891_178_560 and t["dtype"] == "bf16" and round(t["gb"], 1) == 23.8
    assert round(flux[("black-forest-labs/FLUX.1-schnell", "text_encoder_2")]["gb"], 1) == 9.5  # T5-XXL
    assert flux[("yuvalkirstain/PickScore_v1", "pickscore")]["parameters"] == 986_109_441
    dmd2 = {(r["source"], r["part"]): r for r in rehearse.downloads(load_spec(str(launch.SPECS / "sdxl_dmd2.json")),
                                                                     "pso.py")}
    unet = dmd2[("tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin")]
    assert unet["dtype"] == "fp16" and unet["parameters"] == 2_567_463_684  # the student's file, not the base UNet
    assert ("stabilityai/stable-diffusion-xl-base-1.0", "unet") not in dmd2  # PSO builds the student only
    assert dmd2[("stabilityai/stable-diffusion-xl-base-1.0", "text_encoder_2")]["dtype"] == "fp32"  # no variant
    turbo = {(r["source"], r["part"]): r for r in rehearse.downloads(load_spec(str(launch.SPECS / "sdxl_turbo.json")),
                                                                      "pso.py")}
    assert turbo[("stabilityai/sdxl-turbo", "unet")]["dtype"] == "fp16"  # the spec's "variant": "fp16"
    dipp = rehearse.downloads(load_spec(str(launch.SPECS / "sd_turbo_dipp.json")), "diff_instruct_pp.py")
    assert {r["part"] for r in dipp if r["source"] == "THUDM/ImageReward"} and all(
        r["gb"] is None for r in dipp if r["source"] == "THUDM/ImageReward")  # no config: size unknown, said
    assert "322.0 GB" in rehearse.dataset_size({"dataset": "yuvalkirstain/pickapic_v2"})
    assert "unknown" in rehearse.dataset_size({"dataset": "someone/their-own-set"})
    klein = load_spec(str(launch.SPECS / "flux2_klein.json"))  # base transfer trains on the base: its transformer too
    moved = {(r["source"], r["part"]): r for r in rehearse.downloads(klein, "pso.py", "base-transfer")}
    base = moved[("black-forest-labs/FLUX.2-klein-base-4B", "transformer")]
    assert base["note"] == "teacher" and base["dtype"] == "bf16" and round(base["gb"], 1) == 7.8
    assert ("black-forest-labs/FLUX.2-klein-base-4B", "transformer") not in {
        (r["source"], r["part"]) for r in rehearse.downloads(klein, "pso.py", "online")}


# --------------------------------------------------------------------------------------------- synthetic data
def test_synthetic_pairs_have_pickapic_v2s_columns_and_read_like_the_real_ones(tmp_path):
    import pyarrow.parquet as pq

    from full import data

    files = rehearse.write_pickapic(tmp_path / "pairs", 2500, rows_per_file=1000, row_group=400)
    assert len(files) == 3 and [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [3, 3, 2]
    assert pq.ParquetFile(files[0]).schema_arrow.names == PICKAPIC_V2_COLUMNS
    source = rehearse.synthetic_source("pairs", {"dataset": "yuvalkirstain/pickapic_v2", "split": "train"},
                                       tmp_path, 2500)
    pairs = data.PreferencePairs(source)
    assert 0.08 < pairs.ties / 2500 < 0.16 and len(pairs) == 2500 - pairs.ties
    win, lose = pairs.images(3, 32)
    assert win.shape == lose.shape == (3, 32, 32)
    table = pq.read_table(files[0], columns=["label_0", "jpg_0", "jpg_1"]).to_pylist()
    first = next(r for r in table if r["label_0"] == 0.0)  # the preferred image is put first
    assert first["jpg_1"] != first["jpg_0"]


@pytest.mark.parametrize("name", sorted(launch.SETTINGS))
def test_the_rehearsal_runs_one_update_of_everything_a_setting_counts_in_updates(name, tmp_path):
    """Every `--...-steps` count and evaluation size of the setting is overridden: the de-distill settings' 3000
    adapter updates made their rehearsal run for hours."""
    _, argv = launch.method_argv(name, "spec.json", 1, rehearse.small_run(name, tmp_path))
    last = {flag: argv[len(argv) - 1 - argv[::-1].index(flag) + 1] for flag in argv if flag.startswith("--")
            and (flag.endswith("-steps") or flag.endswith("-samples")) and flag != "--gradient-accumulation-steps"}
    assert last and all(int(v) <= 2 for v in last.values()), last


def test_rehearsal_spec_reads_the_real_sets_rows_and_scales_the_embedding_cache_to_the_real_length(tmp_path):
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    spec_path, notes = rehearse.rehearsal_spec(str(launch.SPECS / "flux2_klein.json"), tmp_path, 100)
    d = json.loads(spec_path.read_text())
    assert d["max_sequence_length"] == rehearse.TOKENS and rehearse.prompt_tokens(load_spec(
        str(launch.SPECS / "flux2_klein.json"))) == 512  # the pipeline's; the rehearsal's is shorter, and said
    assert any("max_sequence_length: 32" in n and "512" in n for n in notes)
    target = d["data"]["target"]["data_files"]["train"]
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in target) == 1221  # naruto-blip-captions' card
    assert rehearse.prompt_tokens(load_spec(str(launch.SPECS / "sdxl_turbo.json"))) is None  # CLIP only: no cut
    cache = tmp_path / "cache" / "key"
    cache.mkdir(parents=True)
    for i in range(3):  # FLUX.2's prompt_embeds [tokens, 3 x 2560] and a per-prompt vector that does not scale
        save_file({"0": torch.zeros(32, 7680), "1": torch.zeros(768)}, str(cache / f"{i}.safetensors"))
    n, here, real = rehearse.embedding_cache_size(tmp_path / "cache", 32, 512, 2)
    assert n == 3 and here > 3 * 32 * 7680 * 4 and real == 3 * (512 * 7680 + 768) * 2


@pytest.mark.slow
def test_memory_does_not_grow_with_the_pairs_rows(tmp_path):
    """Write and open (datasets' parquet loader, ties dropped, 8 pairs decoded) 10k and 100k rows in fresh
    processes: the peak anonymous memory (sampled RssAnon; file-backed pages of the memory-mapped Arrow cache
    are the page cache's) differs by far less than the data (a 100k-row set held in RAM would be ~280 MB)."""
    probe = tmp_path / "probe.py"
    probe.write_text('''
import json, sys, threading, time
from pathlib import Path
def anon():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
import torch
from full import data, rehearse
rows, root = int(sys.argv[1]), Path(sys.argv[2])
pairs = data.PreferencePairs(rehearse.synthetic_source("pairs", {"dataset": "x/y"}, root, rows))
for j in torch.randint(0, len(pairs), (8,), generator=torch.Generator().manual_seed(0)).tolist():
    pairs.images(j, 32)
time.sleep(0.05)
size = sum(f.stat().st_size for f in (root / "datasets-cache").rglob("*.arrow"))
print(json.dumps({"peak_anon_mib": peak[0], "pairs": len(pairs), "arrow_mib": size / 2**20}))
''')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = {}
    for rows in (10_000, 100_000):
        p = subprocess.run([sys.executable, str(probe), str(rows), str(tmp_path / str(rows))], env=env,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        out[rows] = json.loads(p.stdout.strip().splitlines()[-1])
    (tmp_path.parent / "pairs_memory.json").write_text(json.dumps(out))
    growth = out[100_000]["peak_anon_mib"] - out[10_000]["peak_anon_mib"]
    assert out[100_000]["arrow_mib"] > 200 and growth < 48, out


# --------------------------------------------------------------------------------------------- the rehearsal
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(launch.SETTINGS))
def test_every_setting_rehearses_on_the_cpu(name, tmp_path):
    """`python -m full.launch SETTING --rehearse` (80 GB, one process): the command, the memory plan computed now,
    the downloads, 100k synthetic pairs where the spec names pairs, and one update + evaluation at depth 1."""
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}  # (every core: a rehearsal that
    # precomputes a data set's captions spends minutes in its text encoder)
    p = subprocess.run([sys.executable, "-m", "full.rehearse", name, "--gpu-memory", "80", "--keep",
                        str(tmp_path / "work"), "--json", str(report)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=3600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"rehearsal of {name}: passed" in p.stdout
    r = json.loads(report.read_text())
    assert r["fits"] and defaults.fits(r["plan"]["peak_gib"], 80) and r["download_gb"] > 1
    row = r["run"]["log"][-1]
    assert int(row["step"]) == 1 and float(row["nfe"]) == r["plan"]["stated_nfe"]
    assert r["embeddings"]["count"] > 0 and r["embeddings"]["bytes_real"] > 0
    for o in r["run"]["opened"]:  # a data set the card sizes is rehearsed at that size (1,221 naruto rows)
        assert o["kind"] != "ImageCaptions" or "folder" in o["source"] or o["rows"] == 1221, o
    shutil.rmtree(tmp_path / "work")  # kept for a failure only: 100k pairs, their Arrow cache and the embedding
    # cache take 1-3 GB a setting (42 GB for all 26), and pytest keeps its last three runs' folders
