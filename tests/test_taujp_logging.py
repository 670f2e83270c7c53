"""TauJpTrainer's logged `taujp_penalty` / `task_loss`: the mean of the per-step values over each logging window
(kept on the device between logs, synchronised once per log)."""

import pytest
import torch

from hf_taujp.linearize import linearize
from hf_taujp.trainer import TauJpConfig, TauJpTrainer
from tests.tiny_models import tiny_bert


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (x := torch.randint(0, 50, (6,), generator=g)), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": x[0] % 3} for _ in range(n)]


class _Recording(TauJpTrainer):
    """Records every penalty the trainer computes (the values the log must average)."""

    def taujp_penalties_on(self, model, batches):
        out = super().taujp_penalties_on(model, batches)
        self.seen.append(float(out.mean()))
        return out


def test_logged_penalty_is_the_mean_over_each_logging_window(tmp_path):
    base = tiny_bert(vocab_size=50, num_hidden_layers=1, max_position_embeddings=16, num_labels=3)
    names = [n for n, _ in base.named_parameters() if "classifier" in n]
    lin = linearize(base, parameter_names=names, tangents={n: 0.1 * torch.randn_like(p) for n, p in base.named_parameters()
                                                           if n in names})
    args = TauJpConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6,
                       logging_steps=3, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                       taujp_lambda=0.5, taujp_mode="cyclic", taujp_batch_ratio=0.5)
    tr = _Recording(model=lin, args=args, train_dataset=_rows(24, 0),
                    regularization_datasets={"a": _rows(8, 1), "b": _rows(8, 2)})
    tr.seen = []
    tr.train()
    logged = [h["taujp_penalty"] for h in tr.state.log_history if "taujp_penalty" in h]
    assert len(tr.seen) == 6
    assert logged == [pytest.approx(sum(tr.seen[:3]) / 3, rel=1e-5), pytest.approx(sum(tr.seen[3:]) / 3, rel=1e-5)]
    assert all(acc == [None, 0] for acc in tr._taujp_log.values())  # windows are reset after each log
