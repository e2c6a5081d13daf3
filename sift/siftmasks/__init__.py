"""SIFT-Masks (Kuo et al., arXiv 2504.04626): sign-fixed fine-tuning and local masks.

One sign vector v (from a seed, never from data) is shared by every shard; each shard is fully
fine-tuned on chosen weight matrices with every step projected back into the cone tau * v >= 0;
its local mask is m_c = 1{tau_c * v > 0}. The merged sum of deltas is kept exactly (the int64
accumulator of sift.merge.state), served as theta0 + tau / T without a task id, and as
theta0 + (tau * m_c) / T for a request routed to shard c.
"""
