"""The shipped SNI sample: its train-split tasks train the demo, its test-split tasks are there to try
held-out evaluation, and `sni-sample` / `data/sni` find it from any directory."""

import json

from finetune_helpers import SNI, SNI_TEST_TASKS, SNI_TRAIN_SPLIT

from optiml_jax.data.formats.sni import read_split_file
from optiml_jax.eval.tasks import load_eval_tasks
from optiml_jax.paths import shipped_data
from optiml_jax.run_config import load_run_config


def test_test_split_tasks_are_real_licensed_and_not_trained_on_by_the_demo():
    test_split = set(read_split_file(SNI / "splits" / "default" / "test_tasks.txt"))
    train_split = set(read_split_file(SNI_TRAIN_SPLIT))
    for name in SNI_TEST_TASKS:
        task = json.loads((SNI / f"{name}.json").read_text(encoding="utf-8"))
        assert name in test_split and name not in train_split
        assert task["Instance License"] and task["Instances"]
        assert all(i["id"].startswith(name.split("_")[0] + "-") for i in task["Instances"])
    demo = load_run_config("demo")
    assert (
        demo.data.train == "data/sni" and demo.data.train_tasks == "data/sni/splits/default/train_tasks.txt"
    )


def test_sni_sample_and_data_sni_name_the_shipped_sample_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, split = shipped_data("sni-sample", "splits/default/test_tasks.txt")
    assert data == str(SNI) and split == str(SNI / "splits" / "default" / "test_tasks.txt")
    assert shipped_data("data/sni", None) == (str(SNI), None)
    tasks = load_eval_tasks(data, split, max_instances=0)
    assert [(t.name, len(t.instances)) for t in tasks] == [(SNI_TEST_TASKS[0], 60), (SNI_TEST_TASKS[1], 40)]
    # a path that exists here is the user's, not the sample
    (tmp_path / "sni-sample").mkdir()
    assert shipped_data("sni-sample", None) == ("sni-sample", None)
    (tmp_path / "data" / "sni").mkdir(parents=True)
    assert shipped_data("data/sni", None) == ("data/sni", None)
