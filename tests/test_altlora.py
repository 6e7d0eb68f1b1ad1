"""`altlora` (methods/altlora.py): its projections against dense float64 least squares, its
alternation schedule against a re-derivation of the official LogTrainer counter, its steps
against a float64 hand port of the official `altlora.step`, and one MiniLM trial."""

from __future__ import annotations

import torch

import methods
from harness.training.train import train_step
from methods.altlora import active_factors, altlora_transform, project_a, project_b
from tests.builders import LAYER, batch, ctx, tiny_bert

RANK, LR, WD, BETA1, REG = 4, 0.05, 0.01, 0.9, 1e-3
HEAD_BETAS, HEAD_EPS = (0.9, 0.999), 1e-8


# ---------------------------------------------------------------- projections


def _vec(m: torch.Tensor) -> torch.Tensor:
    return m.T.reshape(-1)  # column-major: vec(B X) = (I kron B) vec(X)


def _unvec(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return v.reshape(cols, rows).T


def _lstsq_factor(design: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_x ||design x - target||^2 + ridge ||x||^2 by lstsq on the stacked system."""
    n = design.shape[1]
    stacked = torch.cat([design, ridge**0.5 * torch.eye(n, dtype=design.dtype)])
    rhs = torch.cat([target, torch.zeros(n, dtype=target.dtype)])
    return torch.linalg.lstsq(stacked, rhs[:, None], driver="gelsd").solution[:, 0]


def _projections_match(proj_a, proj_b, ridge: float) -> bool:
    """Whether proj_a(B, g_A) = s argmin_X ||B X - G|| (+ ridge) and proj_b(A, g_B) =
    s argmin_Y ||Y A - G|| (+ ridge), for LoRA's g_A = s B^T G, g_B = s G A^T."""
    g = torch.Generator().manual_seed(0)
    k, d, r, s = 7, 5, 3, 2.0
    big_g = torch.randn(k, d, generator=g, dtype=torch.float64)
    b = torch.randn(k, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, d, generator=g, dtype=torch.float64)
    design_x = torch.kron(torch.eye(d, dtype=b.dtype), b)  # vec(B X) = (I kron B) vec(X)
    design_y = torch.kron(a.T.contiguous(), torch.eye(k, dtype=a.dtype))  # (A^T kron I) vec(Y)
    x = _unvec(_lstsq_factor(design_x, _vec(big_g), ridge), r, d)
    y = _unvec(_lstsq_factor(design_y, _vec(big_g), ridge), k, r)
    ok_a = torch.allclose(proj_a(b, s * b.T @ big_g, ridge), s * x, atol=1e-10, rtol=1e-8)
    ok_b = torch.allclose(proj_b(a, s * big_g @ a.T, ridge), s * y, atol=1e-10, rtol=1e-8)
    return ok_a and ok_b


def test_projections_are_the_least_squares_solutions_over_the_active_factor():
    for ridge in (0.0, 0.3):  # exact projection, and the damped one (a ridge regression)
        assert _projections_match(project_a, project_b, ridge)
    # Deliberately wrong versions fail: the raw gradient, a Gram product instead of a solve.
    assert not _projections_match(lambda b, ga, lam: ga, lambda a, gb, lam: gb, 0.0)
    assert not _projections_match(
        lambda b, ga, lam: b.T @ b @ ga, lambda a, gb, lam: gb @ (a @ a.T), 0.0
    )


def test_a_b_step_moves_w_by_the_gradient_projected_onto_the_row_space_of_a():
    """Step 1 (bias-corrected, zero momentum): direction = projection. An SGD step on B then
    changes s B A by -lr s^2 G pinv(A) A, the full gradient projected onto A's row space."""
    g = torch.Generator().manual_seed(1)
    k, d, r, s = 6, 5, 2, 1.5
    a = torch.randn(r, d, generator=g, dtype=torch.float64)
    b = torch.randn(k, r, generator=g, dtype=torch.float64)
    big_g = torch.randn(k, d, generator=g, dtype=torch.float64)
    names = ("x.lora_A.default.weight", "x.lora_B.default.weight")
    transform = altlora_transform(BETA1, 1e-12, every=1)  # step 1: only A; step 2: only B
    params = dict(zip(names, (a, b), strict=True))
    out = transform(params, dict(zip(names, (s * b.T @ big_g, s * big_g @ a.T), strict=True)))
    torch.testing.assert_close(out[names[0]], torch.linalg.pinv(b) @ big_g * s)
    assert not out[names[1]].any()  # B inactive at step 1
    out = transform(params, dict(zip(names, (s * b.T @ big_g, s * big_g @ a.T), strict=True)))
    assert not out[names[0]].any()
    delta_w = s * (-LR * out[names[1]]) @ a
    torch.testing.assert_close(delta_w, -LR * s**2 * big_g @ torch.linalg.pinv(a) @ a)


# ---------------------------------------------------------------- the schedule


class OfficialToggle:
    """logtrainer.py LogTrainer.training_step's alternation, re-derived: a counter per
    micro-batch; at each multiple of alter_freq x accumulation it freezes one factor and
    unfreezes the other, starting with A; before the first toggle both are trainable."""

    def __init__(self, alter_freq: int, alt: bool = True) -> None:
        self.freq, self.alt, self.counter = alter_freq, alt, 0
        self.update_a, self.trainable = True, {"A", "B"}

    def next_step(self) -> set[str]:  # one micro-batch per optimizer step
        self.counter += 1
        if self.alt and self.counter % self.freq == 0:
            self.trainable = {"A"} if self.update_a else {"B"}
            self.update_a = not self.update_a
        return set(self.trainable)


def test_schedule_is_the_official_logtrainer_alternation():
    for freq in (1, 3, 10):
        official = OfficialToggle(freq)
        seq = [official.next_step() for _ in range(65)]
        assert seq == [set(active_factors(t, freq)) for t in range(1, 66)], freq
        # A deliberately off-by-one schedule ((t - 1) // freq) disagrees with it.
        off = [set(active_factors(t - 1, freq)) if t > 1 else {"A", "B"} for t in range(1, 66)]
        assert off != seq
    assert [set(active_factors(t, 10)) for t in (1, 9, 10, 19, 20, 29, 30)] == [
        {"A", "B"}, {"A", "B"}, {"A"}, {"A"}, {"B"}, {"B"}, {"A"},
    ]  # fmt: skip
    joint = OfficialToggle(10, alt=False)
    assert all(joint.next_step() == set(active_factors(t, 10, False)) for t in range(1, 40))


# ---------------------------------------------------------------- steps through the harness


def prepared(seed: int = 1, **overrides):
    """An altlora model whose B is moved off zero, so every projection and transport matters."""
    method = methods.get_method("altlora")
    hp = method.hyperparams(
        {"rank": RANK, "precond_damping": REG, "beta1": BETA1, "alternate_every": 2, **overrides}
    )
    model = method.prepare(tiny_bert(), hp, ctx())
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return method, hp, model.train()


def official_steps(model, batches, every, wd=WD, transport=True, correct_bias=True, shift=0):
    """A float64 port of optimizer_new.py `altlora.step` (explicit inverses, its p2old / p1old
    transports, per-factor step counts), with LogTrainer's toggle deciding which factors have
    gradients; at joint steps both use the pre-step factors (our documented choice), weight
    decay is SGD's L2 (ours), the head is textbook AdamW (ours). `transport`, `correct_bias`
    and `shift` (a shifted schedule) give deliberately wrong versions."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {n: [torch.zeros_like(p, dtype=torch.float64), None, 0] for n, p in params.items()}
    toggle = OfficialToggle(every)
    schedule = [toggle.next_step() for _ in range(len(batches) + shift)][shift:]
    eye = torch.eye(RANK, dtype=torch.float64)
    for trainable, b in zip(schedule, batches, strict=True):
        model.zero_grad()
        model(**b).loss.backward()
        grads = {n: p.grad.double() for n, p in params.items()}
        vals = {n: p.detach().double() for n, p in params.items()}
        new = {}
        for n in params:
            st = state[n]
            if ".lora_A." in n or ".lora_B." in n:
                is_a = ".lora_A." in n
                swap = (".lora_A.", ".lora_B.") if is_a else (".lora_B.", ".lora_A.")
                other = vals[n.replace(*swap)]
                if st[1] is None:
                    st[1] = torch.zeros_like(other)  # official state['p2old'] / ['p1old']
                if ("A" if is_a else "B") not in trainable:
                    new[n] = vals[n] * (1 - LR * wd)
                    continue
                if is_a:
                    inv = torch.linalg.inv(other.T @ other + REG * eye)
                    p_t = inv @ other.T @ st[1] if transport else eye
                    st[0] = BETA1 * p_t @ st[0] + (1 - BETA1) * inv @ grads[n]
                else:
                    inv = torch.linalg.inv(other @ other.T + REG * eye)
                    p_t = st[1] @ other.T @ inv if transport else eye
                    st[0] = BETA1 * st[0] @ p_t + (1 - BETA1) * grads[n] @ inv
                st[1], st[2] = other.clone(), st[2] + 1
                step = st[0] / (1 - BETA1 ** st[2]) if correct_bias else st[0]
                new[n] = vals[n] - LR * (step + wd * vals[n])
            else:  # the head: AdamW
                st[1] = torch.zeros_like(vals[n]) if st[1] is None else st[1]
                st[2] += 1
                st[0] = HEAD_BETAS[0] * st[0] + (1 - HEAD_BETAS[0]) * grads[n]
                st[1] = HEAD_BETAS[1] * st[1] + (1 - HEAD_BETAS[1]) * grads[n] ** 2
                m_hat = st[0] / (1 - HEAD_BETAS[0] ** st[2])
                v_hat = st[1] / (1 - HEAD_BETAS[1] ** st[2])
                new[n] = vals[n] * (1 - LR * wd) - LR * m_hat / (v_hat.sqrt() + HEAD_EPS)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(new[n].to(p.dtype))
    model.zero_grad()
    return {n: p.detach().clone() for n, p in params.items()}


def ours_steps(method, hp, model, batches, wd=WD, transform=True):
    optimizer = method.build_optimizer(model, LR, hp, weight_decay=wd)
    assert type(optimizer) is torch.optim.SGD
    grad_transform = method.gradient_transform(hp) if transform else None
    for b in batches:
        train_step(model, b, optimizer, None, None, grad_transform)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(x: dict, y: dict) -> bool:
    """The assertion's tolerance, over every LoRA factor."""
    return all(torch.allclose(x[n], y[n], atol=1e-6, rtol=1e-5) for n in x if "lora_" in n)


def test_eight_steps_equal_the_official_update_and_wrong_versions_do_not():
    """every = 2: step 1 both, 2-3 A, 4-5 B, 6-7 A, 8 B - joint, alternation, transports."""
    batches = [batch(20 + i) for i in range(8)]
    expected = official_steps(prepared()[2], batches, every=2)
    method, hp, model = prepared()
    got = ours_steps(method, hp, model, batches)
    assert set(got) == set(expected)
    assert any(".lora_A." in n for n in got) and any("classifier" in n for n in got)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    # The comparison can fail: no momentum transport, no bias correction, a shifted schedule,
    # or plain SGD on the raw gradients each land outside its tolerance.
    for wrong in ({"transport": False}, {"correct_bias": False}, {"shift": 1}):
        assert not _close(got, official_steps(prepared()[2], batches, every=2, **wrong)), wrong
    method, hp, model = prepared()
    assert not _close(ours_steps(method, hp, model, batches, transform=False), expected)


def test_the_inactive_factor_does_not_move_and_joint_mode_moves_both():
    method, hp, model = prepared()
    a_name = f"base_model.model.{LAYER}.lora_A.default.weight"
    b_name = a_name.replace("lora_A", "lora_B")
    optimizer = method.build_optimizer(model, LR, hp, weight_decay=0.0)
    transform = method.gradient_transform(hp)
    seen = []
    for t in range(1, 6):
        before = {n: model.get_parameter(n).detach().clone() for n in (a_name, b_name)}
        train_step(model, batch(40 + t), optimizer, None, 1.0, transform)
        moved = {k for k, n in (("A", a_name), ("B", b_name))
                 if not torch.equal(model.get_parameter(n), before[n])}  # fmt: skip
        seen.append(moved)
    assert seen == [{"A", "B"}, {"A"}, {"A"}, {"B"}, {"B"}]
    method, hp, model = prepared(alternate=False)
    optimizer = method.build_optimizer(model, LR, hp)
    transform = method.gradient_transform(hp)
    for t in range(1, 4):
        before = [model.get_parameter(n).detach().clone() for n in (a_name, b_name)]
        train_step(model, batch(50 + t), optimizer, None, None, transform)
        assert not torch.equal(model.get_parameter(a_name), before[0])
        assert not torch.equal(model.get_parameter(b_name), before[1])


# ---------------------------------------------------------------- defaults and the harness


def test_defaults_are_the_official_ones_and_zero_validation_accepts_it():
    from harness.spec.config import validate_config, zero_unsupported_reason
    from tests.builders import sweep_config

    method = methods.get_method("altlora")
    hp = method.hyperparams({})
    assert (hp.rank, hp.alpha, hp.alternate, hp.alternate_every) == (8, 16.0, True, 10)
    assert (hp.beta1, hp.precond_damping, hp.bias_correction, hp.use_rslora) == (
        0.9, 1e-5, True, False,
    )  # fmt: skip
    assert method.starts_at_base(hp)
    model = method.prepare(tiny_bert(), method.hyperparams({"rank": RANK}), ctx())
    layer = model.base_model.model.get_submodule(LAYER)
    assert not layer.lora_B["default"].weight.any() and layer.scaling["default"] == 16.0 / RANK
    assert zero_unsupported_reason(method, hp) is None  # a gradient transform: ZeRO-capable
    assert validate_config(
        sweep_config(distributed={"workers": 2}, methods={"altlora": {"lrs": [1e-3]}})
    )


def test_single_cpu_minilm_trial_gives_an_ok_row_with_passing_checks(mirror_dir):
    from harness.training.trial import run_trial
    from tests.builders import trial_spec

    trial = trial_spec(mirror_dir, method="altlora", max_steps=4).model_copy(
        update={"method_overrides": {"alternate_every": 2}}
    )  # steps: 1 both, 2-3 A, 4 B
    row = run_trial(trial)
    assert row["status"] == "ok", row.get("traceback")
    assert row["method"] == "altlora" and row["steps"] == 4
    assert row["trainable_params"] == row["expected_trainable_params"] < row["total_params"]
    assert row["sanity_init"].startswith("identity")
    assert row["sanity_merge"].startswith("merged == unmerged")
