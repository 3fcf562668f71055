"""The format warm-up's pure parts (benchmarks/studies/format_warmup.py): the model's own result, never the gold answer,
becomes the target; the loss covers only the target tokens."""

from __future__ import annotations

from pathlib import Path

from benchmarks.studies.format_warmup import batch_tensors, build_rows, model_result, summary, warmup_target
from cipo_nemo.data.sources import TaskItem


def _item(index, expression, answer):
    return TaskItem(id=f"p{index}", family="math", prompt=f"Calculate {expression}.", messages=None, answer=answer,
                    origin="test", metadata={"expression": expression})


def test_the_result_is_the_number_after_the_first_equals_sign():
    assert model_result("3 + 6 = 9") == "9"
    assert model_result("4 - 9 = -5, so") == "-5"
    assert model_result("We get 4 - 9 = (4 - 9) + 4 = 9 - 4 = 5") == "9"  # the first '= N', a fixed rule
    assert model_result("Three + six equals 9.") is None  # no '=': no result, no target


def test_targets_carry_the_models_result_even_when_it_is_wrong():
    items = [_item(0, "3 + 6", "9"), _item(1, "4 - 9", "-5")]
    samples = [{"id": "p0", "responses": ["3 + 6 = 9", "3 + 6 = 8", "nine"], "rewards": [0.0, 0.0, 0.0]},
               {"id": "p1", "responses": ["4 - 9 = 5. The answer is 5."], "rewards": [0.0]}]
    rows = build_rows(items, samples)
    assert [row["target"] for row in rows] == [
        "3 + 6 = 9. The answer is 9.", "3 + 6 = 8. The answer is 8.", None, "4 - 9 = 5. The answer is 5."]
    assert [row["result_is_gold"] for row in rows] == [True, False, False, False]
    assert summary(rows) == {"replies": 4, "with_result": 3, "result_is_gold": 1, "reply_right": 0}
    assert warmup_target("2 + 2", "4") == "2 + 2 = 4. The answer is 4."


def test_the_loss_covers_the_target_and_not_the_prompt_or_padding():
    batch = batch_tensors([([5, 6, 7], [8, 2]), ([5], [9, 9, 2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [5, 9, 9, 2, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 2], [-100, 9, 9, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_the_study_config_asks_what_the_warm_up_taught():
    from benchmarks.studies.format_warmup import TARGET_FORMAT
    from benchmarks.studies.screen_tasks import FORMATS
    from cipo_nemo.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "conf" / "study_smollm2_warm.yaml")
    taught = FORMATS[TARGET_FORMAT]
    assert cfg.data.instructions.math == taught.instruction
    assert cfg.cipo.templates.math == taught.correction_template
    assert cfg.data.system_prompt == taught.system_prompt
