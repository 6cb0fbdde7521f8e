//! Optimisation over flat buffers: every variable of a model becomes a view into one contiguous
//! tensor, so SGD, gradient clipping and the EMA are a handful of kernels per step instead of
//! several per parameter. On a GPU a training step is bound by per-operation overhead (see
//! `bench/results/gpu-train-step-*.json`); libtorch's C++ SGD issues about five operations for
//! each of a model's hundreds of parameters. The momentum buffer is ours, so checkpoints carry
//! it and a resumed run continues exactly.

use tch::{Kind, Tensor, nn};

/// The variables of a [`nn::VarStore`] laid out in one flat tensor, trainable ones first.
#[derive(Debug)]
pub struct FlatVars {
    /// All variables, `[numel]`.
    pub flat: Tensor,
    /// Elements of the trainable prefix of `flat`.
    pub trainable_numel: i64,
    /// (name, trainable, variable), in layout order.
    vars: Vec<(String, bool, Tensor)>,
    /// The gradients of the trainable prefix, once every trainable variable has one: each
    /// variable's gradient is then a view of this buffer (backward accumulates into it in place),
    /// so gathering them is free and zeroing them is one kernel instead of one per variable.
    grad: std::cell::OnceCell<Tensor>,
}

impl FlatVars {
    /// Move the variables of `vs` into one buffer (their values are kept) and make each a view of
    /// it. Run again after anything that replaces a variable's storage (`VarStore::load`).
    pub fn bind(vs: &nn::VarStore) -> Self {
        let trainable: std::collections::HashSet<String> = {
            let all = vs.variables();
            let train = vs.trainable_variables();
            all.iter()
                .filter(|(_, t)| train.iter().any(|v| v.data_ptr() == t.data_ptr()))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let mut layout: Vec<(String, bool)> = vs
            .variables()
            .into_keys()
            .map(|n| {
                let train = trainable.contains(&n);
                (n, train)
            })
            .collect();
        // Trainable first, then by name: a stable layout for checkpoints.
        layout.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Self::bind_in(vs, &layout)
    }

    /// [`Self::bind`] `vs` with the layout of `like` (same variable names), e.g. an EMA copy of a
    /// model, whose variables are all frozen.
    pub fn bind_like(vs: &nn::VarStore, like: &FlatVars) -> Self {
        let layout: Vec<(String, bool)> = like
            .vars
            .iter()
            .map(|(n, train, _)| (n.clone(), *train))
            .collect();
        Self::bind_in(vs, &layout)
    }

    fn bind_in(vs: &nn::VarStore, layout: &[(String, bool)]) -> Self {
        let all = vs.variables();
        let mut vars: Vec<(String, bool, Tensor)> = layout
            .iter()
            .filter_map(|(n, train)| all.get(n).map(|t| (n.clone(), *train, t.shallow_clone())))
            .collect();
        let total: i64 = vars.iter().map(|(_, _, t)| t.numel() as i64).sum();
        let trainable_numel: i64 = vars
            .iter()
            .filter(|(_, train, _)| *train)
            .map(|(_, _, t)| t.numel() as i64)
            .sum();
        let flat = Tensor::zeros([total], (Kind::Float, vs.device()));
        let mut offset = 0;
        tch::no_grad(|| {
            for (_, _, var) in &mut vars {
                let n = var.numel() as i64;
                let mut view = flat.narrow(0, offset, n).view(var.size().as_slice());
                view.copy_(var);
                var.set_data(&view);
                offset += n;
            }
        });
        Self {
            flat,
            trainable_numel,
            vars,
            grad: std::cell::OnceCell::new(),
        }
    }

    /// The trainable prefix of the buffer.
    pub fn trainable(&self) -> Tensor {
        self.flat.narrow(0, 0, self.trainable_numel)
    }

    /// The gradients of the trainable variables in layout order, as one tensor (zeros for a
    /// variable without a gradient). Once the gradients share one buffer (after the first
    /// [`Self::zero_gradients`] that follows a backward pass), this is that buffer, not a copy.
    pub fn gradients(&self) -> Tensor {
        if let Some(g) = self.grad.get() {
            return g.shallow_clone();
        }
        let grads: Vec<Tensor> = self
            .vars
            .iter()
            .filter(|(_, train, _)| *train)
            .map(|(_, _, v)| {
                let g = v.grad();
                if g.defined() {
                    g.view([-1])
                } else {
                    v.zeros_like().view([-1])
                }
            })
            .collect();
        Tensor::cat(&grads, 0)
    }

    /// Zero every trainable variable's gradient (kept allocated for the next backward pass).
    /// The first time every trainable variable has a gradient, the gradients move into one flat
    /// buffer (each becomes a view of it, as the variables are of [`Self::flat`]); from then on
    /// this is a single kernel.
    pub fn zero_gradients(&self) {
        if let Some(g) = self.grad.get() {
            let _ = g.shallow_clone().zero_();
            return;
        }
        let trainable = || self.vars.iter().filter(|(_, train, _)| *train);
        if trainable().all(|(_, _, v)| v.grad().defined()) {
            let flat = Tensor::zeros([self.trainable_numel], (Kind::Float, self.flat.device()));
            let mut offset = 0;
            tch::no_grad(|| {
                for (_, _, v) in trainable() {
                    let n = v.numel() as i64;
                    // The gradient keeps its identity (autograd's handle), its data moves.
                    v.grad()
                        .set_data(&flat.narrow(0, offset, n).view(v.size().as_slice()));
                    offset += n;
                }
            });
            // `set` fails only when already set, which the early return above rules out.
            let _ = self.grad.set(flat);
            return;
        }
        for (_, _, v) in trainable() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// 1 for the trainable elements whose variable `decayed(name)` selects, 0 for the others.
    pub fn trainable_mask(&self, decayed: impl Fn(&str) -> bool) -> Tensor {
        let parts: Vec<Tensor> = self
            .vars
            .iter()
            .filter(|(_, train, _)| *train)
            .map(|(name, _, v)| {
                let value = if decayed(name) { 1.0 } else { 0.0 };
                Tensor::full([v.numel() as i64], value, (Kind::Float, self.flat.device()))
            })
            .collect();
        Tensor::cat(&parts, 0)
    }
}

/// SGD with (Nesterov) momentum and masked weight decay on a flat parameter buffer, as
/// `torch.optim.SGD` computes it: `d = g + wd·mask·p; buf = μ·buf + d; p −= lr·(d + μ·buf)`
/// (`p −= lr·buf` without Nesterov).
#[derive(Debug)]
pub struct FlatSgd {
    /// Momentum buffer, one value per trainable element.
    pub momentum_buffer: Tensor,
    /// Weight decay per trainable element (0 where none).
    decay: Tensor,
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
}

impl FlatSgd {
    /// For `vars`, with weight decay `weight_decay` on the elements `decay_mask` marks.
    pub fn new(vars: &FlatVars, decay_mask: &Tensor, weight_decay: f64, momentum: f64) -> Self {
        Self {
            momentum_buffer: vars.trainable().zeros_like(),
            decay: decay_mask * weight_decay,
            lr: 0.0,
            momentum,
            nesterov: true,
        }
    }

    /// One update of `vars`' trainable elements with the flat gradient `grad`.
    pub fn step(&mut self, vars: &FlatVars, grad: &Tensor) {
        tch::no_grad(|| {
            let mut params = vars.trainable();
            let d = grad + &self.decay * &params;
            let _ = self.momentum_buffer.g_mul_scalar_(self.momentum);
            let _ = self.momentum_buffer.g_add_(&d);
            let update = if self.nesterov {
                d + &self.momentum_buffer * self.momentum
            } else {
                self.momentum_buffer.shallow_clone()
            };
            let _ = params.g_sub_(&(update * self.lr));
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::{Device, Kind};

    fn net(vs: &nn::Path) -> nn::Sequential {
        nn::seq()
            .add(nn::linear(vs / "a", 5, 7, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(
                (vs / "no_decay").set_group(1),
                7,
                3,
                Default::default(),
            ))
    }

    #[test]
    fn flat_sgd_matches_libtorchs_sgd_and_views_share_storage() {
        tch::manual_seed(1);
        let ours_vs = nn::VarStore::new(Device::Cpu);
        let ours_net = net(&ours_vs.root());
        let mut theirs_vs = nn::VarStore::new(Device::Cpu);
        let theirs_net = net(&theirs_vs.root());
        theirs_vs.copy(&ours_vs).unwrap();

        let ours_vs_start: std::collections::HashMap<String, Tensor> = ours_vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let flat = FlatVars::bind(&ours_vs);
        assert_eq!(flat.trainable_numel, 5 * 7 + 7 + 7 * 3 + 3);
        let mask = flat.trainable_mask(|name| !name.starts_with("no_decay"));
        let mut sgd = FlatSgd::new(&flat, &mask, 0.05, 0.9);
        let mut opt = nn::Sgd {
            momentum: 0.9,
            dampening: 0.0,
            wd: 0.0,
            nesterov: true,
        }
        .build(&theirs_vs, 0.1)
        .unwrap();
        opt.set_weight_decay_group(0, 0.05);
        opt.set_weight_decay_group(1, 0.0);

        let x = Tensor::rand([4, 5], (Kind::Float, Device::Cpu));
        for step in 0..4 {
            let lr = 0.1 / (step + 1) as f64;
            sgd.lr = lr;
            opt.set_lr(lr);
            ours_net.forward(&x).square().mean(None).backward();
            let g = flat.gradients();
            sgd.step(&flat, &g);
            flat.zero_gradients();
            theirs_net.forward(&x).square().mean(None).backward();
            opt.step();
            opt.zero_grad();
        }
        let theirs = theirs_vs.variables();
        for (name, t) in ours_vs.variables() {
            // The same arithmetic in another order: float rounding only.
            let d = (&t - &theirs[&name]).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{name}: {d}");
            let moved = (&t - &ours_vs_start[&name]).abs().max().double_value(&[]);
            assert!(moved > 1e-4, "{name} did not move: {moved}");
        }
        // After the first zeroing, the gradients are views of one buffer that backward fills.
        ours_net.forward(&x).square().mean(None).backward();
        let g = flat.gradients();
        let gathered: Vec<Tensor> = ours_vs
            .trainable_variables()
            .iter()
            .map(|v| v.grad().view([-1]))
            .collect();
        assert!(g.abs().sum(Kind::Double).double_value(&[]) > 0.0);
        assert_eq!(
            g.sort(0, false).0,
            Tensor::cat(&gathered, 0).sort(0, false).0,
            "the flat gradient holds every variable's gradient"
        );
        flat.zero_gradients();
        for v in ours_vs.trainable_variables() {
            assert_eq!(v.grad().abs().max().double_value(&[]), 0.0);
        }
        // The variables are views of the flat buffer: changing it changes them.
        let _ = flat.flat.shallow_clone().fill_(0.25);
        for (name, t) in ours_vs.variables() {
            assert_eq!(t.abs().max().double_value(&[]), 0.25, "{name}");
        }
    }
}
