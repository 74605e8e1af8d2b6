#!/usr/bin/env python3
"""Generate conf/experiment/*.yaml: the seed README's experiments (CIFAR-10 / ResNet-18) and the
same experiments scaled to Fashion-MNIST / cnn_small for a 2-core CPU."""

from pathlib import Path

out = Path(__file__).resolve().parent.parent / "src/fed_distill/conf/experiment"
EXPS = [
    # name, seed name, description, split, synthesis, extra keys
    (
        "1_teacher_custom",
        "1_teacher_custom",
        "Seed §III: one teacher on all the data, non-adaptive DeepInversion (custom parameters).",
        {"split": "iid", "num_clients": 1},
        "custom",
        {"student": {"adaptive": False}},
    ),
    (
        "1_teacher_custom_adaptive",
        "1_teacher_custom_adaptive",
        "Seed §III: one teacher, Adaptive DeepInversion (competition scale 10).",
        {"split": "iid", "num_clients": 1},
        "custom",
        {},
    ),
    (
        "1_teacher_custom_adaptive_comp0",
        "1_teacher_custom_adaptive + comp_scale=0",
        "Seed §III: the adaptive code path with the competition term switched off.",
        {"split": "iid", "num_clients": 1},
        "custom",
        {"synthesis": {"comp_scale": 0.0}},
    ),
    (
        "1_teacher_paper",
        "1_teacher_paper",
        "Seed §III: one teacher, the DeepInversion paper's parameters.",
        {"split": "iid", "num_clients": 1},
        "paper",
        {},
    ),
    (
        "half_1_teacher",
        "half_1_teacher_custom_adap",
        "Seed §IV: class-disjoint halves; one teacher, the server holds the other half as real data.",
        {"split": "heter", "num_clients": 2, "unif_percentage": 0.0, "server_clients": 1},
        "custom",
        {"student": {"server_data": True}},
    ),
    (
        "half_1_teacher_50_initial",
        "half_1_teacher_custom_adap + initial.num_batches=50, new_batches_per_epoch=2",
        "Seed §IV: half data, 50 initial batches and 2 new batches per epoch.",
        {"split": "heter", "num_clients": 2, "unif_percentage": 0.0, "server_clients": 1},
        "custom",
        {"student": {"server_data": True, "initial_batches": 50, "new_batches_per_epoch": 2}},
    ),
    (
        "half_1_teacher_weighted10",
        "half_1_teacher_custom_weighted (weight 10)",
        "Seed §IV: half data, weight 10 on the classes only the server's real data covers (5-9).",
        {"split": "heter", "num_clients": 2, "unif_percentage": 0.0, "server_clients": 1},
        "custom",
        {"student": {"server_data": True, "class_weights": [1.0] * 5 + [10.0] * 5}},
    ),
    (
        "half_1_teacher_weighted2",
        "half_1_teacher_custom_weighted (weight 2)",
        "Seed §IV: half data, weight 2 on the server-only classes (5-9).",
        {"split": "heter", "num_clients": 2, "unif_percentage": 0.0, "server_clients": 1},
        "custom",
        {"student": {"server_data": True, "class_weights": [1.0] * 5 + [2.0] * 5}},
    ),
    (
        "iid_10_teachers",
        "iid_10_teacher_custom",
        "Seed §IV: IID, 10 teachers cycled round-robin (one per batch).",
        {"split": "iid", "num_clients": 10},
        "custom",
        {},
    ),
    (
        "iid_10_teachers_3000",
        "iid_10_teacher_custom + grad_updates_batch=3000",
        "Seed §IV: IID, 10 teachers, 3000 updates per batch (less noisy images).",
        {"split": "iid", "num_clients": 10},
        "more_iterations",
        {},
    ),
    (
        "iid_10_teachers_sampling3",
        "iid_10_teacher_custom + deep_inv=sampling_experimental",
        "Seed §IV: IID, 10 teachers, Sampling DeepInversion with 3 teachers per step.",
        {"split": "iid", "num_clients": 10},
        "sampling",
        {"synthesis": {"num_teachers": 3}},
    ),
    (
        "iid_10_teachers_sampling5",
        "iid_10_teacher_custom + sampling, num_teachers=5",
        "Seed §IV: IID, 10 teachers, Sampling DeepInversion with 5 teachers per step.",
        {"split": "iid", "num_clients": 10},
        "sampling",
        {"synthesis": {"num_teachers": 5}},
    ),
    (
        "heter_10_teachers_sampling",
        "heter_10_teacher_custom + sampling",
        "Seed §IV: heterogeneous (half uniform, half sorted), 10 teachers, Sampling DeepInversion.",
        {"split": "heter", "num_clients": 10, "unif_percentage": 0.5},
        "sampling",
        {},
    ),
    (
        "full_2_teachers",
        "2_teachers_custom_adap",
        "Seed §IV: class-disjoint, 2 teachers (classes 0-4 and 5-9), Adaptive DI.",
        {"split": "heter", "num_clients": 2, "unif_percentage": 0.0},
        "custom",
        {},
    ),
    (
        "full_2_teachers_3000",
        "2_teachers_custom_adap + grad_updates_batch=3000",
        "Seed §IV: class-disjoint, 2 teachers, 3000 updates per batch.",
        {"split": "heter", "num_clients": 2, "unif_percentage": 0.0},
        "more_iterations",
        {},
    ),
    (
        "full_5_teachers",
        "5_teachers_custom_adap",
        "Seed §IV: class-disjoint, 5 teachers (2 classes each), Adaptive DI.",
        {"split": "heter", "num_clients": 5, "unif_percentage": 0.0},
        "custom",
        {},
    ),
]

CPU_SYNTH = {
    "custom": "cpu",
    "paper": "cpu_paper",
    "more_iterations": "cpu_more_iterations",
    "sampling": "cpu_sampling",
}


def dump(d, indent=0):
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines += dump(v, indent + 2)
        else:
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, list):
                v = "[" + ", ".join(str(x) for x in v) + "]"
            lines.append(" " * indent + f"{k}: {v}")
    return lines


def write(name, seed_name, desc, split, synth, extra, scale):
    sp = dict(split)
    strategy = sp.pop("split")
    body = {"experiment": name, "split": sp}
    for k, v in extra.items():
        body.setdefault(k, {}).update(v)
    if scale == "cifar10":
        groups = {
            "dataset": "cifar10",
            "model": "resnet18",
            "train": "cifar",
            "synthesis": synth,
            "student": "cifar",
        }
        note = "GPU scale: CIFAR-10, ResNet-18 teachers and student, as in the seed project."
    else:
        groups = {
            "dataset": "fashion_mnist",
            "model": "cnn_small",
            "train": "default",
            "synthesis": CPU_SYNTH[synth],
            "student": "default",
        }
        note = "CPU scale: the same experiment on Fashion-MNIST with cnn_small, sized for a 2-core machine."
    text = (
        ["# @package _global_", f"# {desc}", f"# Seed name: {seed_name}. {note}", "defaults:"]
        + [f"  - override /{g}: {o}" for g, o in groups.items()]
        + [f"  - override /split: {strategy}"]
    )
    text += dump(body)
    (out / f"{name}.yaml").write_text("\n".join(text) + "\n")


for e in EXPS:
    write(f"cifar10_{e[0]}", *e[1:], scale="cifar10")
    write(f"fmnist_{e[0]}", *e[1:], scale="fmnist")
print(len(list(out.glob("*.yaml"))))
