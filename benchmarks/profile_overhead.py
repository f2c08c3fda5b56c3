"""What the run profile costs scoring, side by side in one run, on camera-sized 1920x1080 JPEGs.

N photos (``maskmodel.data.synth.render_photo``, faces in busy scenes) on local disk are scored by the
product's own :func:`maskmodel.score.scoring.score` on one local Ray instance, alternately with the profile
(as shipped) and without it (the fold replaced by a no-op, here only), ``--rounds`` times each, each into
its own results folder. Prints, per variant, the median elapsed seconds and img/s, their ratio, and the
driver's own fold seconds that each profiled run records in its commit (``profile.fold_s``) as a share of
its elapsed time: the direct measure, which does not depend on how noisy the machine is.
The model has seeded random weights (speed does not depend on them)::

    PYTHONPATH=. python benchmarks/profile_overhead.py                      # 48 photos, 3 rounds, --faces auto
    PYTHONPATH=. python benchmarks/profile_overhead.py --n 96 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from maskmodel import results
from maskmodel.data import synth
from maskmodel.io import storage
from maskmodel.models.classifier import ModelCard, build_model, save_model_dir, state_dict_bytes
from maskmodel.results import profile as prof
from maskmodel.score import scoring


class NoProfile(prof.RunProfile):
    """The "off" variant: the fold does nothing (the committed profile stays empty)."""

    def update(self, table) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48, help="photos per run")
    p.add_argument("--rounds", type=int, default=3, help="runs of each variant, alternating")
    p.add_argument("--faces", default="auto", help="--faces of the runs (auto: CenterFace, as shipped)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = p.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        images, model = f"{tmp}/images", f"{tmp}/model"
        with ThreadPoolExecutor(4) as pool:
            photos = list(pool.map(lambda i: synth.render_photo(synth.CLASSES[i % 2], i), range(args.n)))
        for i, data in enumerate(photos):
            storage.write_bytes(f"{images}/{i:05d}.jpg", data)
        torch.manual_seed(0)
        save_model_dir(model, state_dict_bytes(build_model("resnet18", 2)),
                       ModelCard(arch="resnet18", classes=synth.CLASSES, input_size=128, resize_size=146))
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        shipped = scoring.RunProfile
        timings: dict[str, list[float]] = {"profile": [], "none": []}
        fold: list[float] = []
        try:
            cfg = scoring.ScoreConfig(input=images, model=model, output=f"{tmp}/warm", faces=args.faces,
                                      precision="fp32")
            scoring.score(cfg)  # warm-up: actor start, model and detector load paid once by the OS caches
            for r in range(args.rounds):
                for variant in (("profile", "none") if r % 2 == 0 else ("none", "profile")):
                    scoring.RunProfile = shipped if variant == "profile" else NoProfile
                    out = f"{tmp}/out-{variant}-{r}"
                    t0 = time.perf_counter()
                    res = scoring.score(scoring.ScoreConfig(input=images, model=model, output=out,
                                                            faces=args.faces, precision="fp32"))
                    timings[variant].append(res.elapsed_s)
                    if variant == "profile":
                        p_run = results.list_commits(out)[0].raw["profile"]
                        fold.append(p_run["fold_s"] / res.elapsed_s)
                    print(f"round {r + 1} {variant:8s} {res.elapsed_s:6.2f} s ({res.images / res.elapsed_s:5.2f} "
                          f"img/s; wall {time.perf_counter() - t0:5.2f} s)", flush=True)
        finally:
            scoring.RunProfile = shipped
            ray.shutdown()
    on, off = statistics.median(timings["profile"]), statistics.median(timings["none"])
    print(f"\n{args.n} photos 1920x1080, --faces {args.faces}, {args.rounds} rounds, {args.cpus} CPUs")
    print(f"median elapsed: with profile {on:.2f} s ({args.n / on:.2f} img/s), without {off:.2f} s "
          f"({args.n / off:.2f} img/s): {100 * (on / off - 1):+.1f} %")
    print(f"driver's fold time / elapsed, per profiled run: {', '.join(f'{100 * f:.3f} %' for f in fold)} "
          f"(target: profile adds <= 5 %)")


if __name__ == "__main__":
    main()
