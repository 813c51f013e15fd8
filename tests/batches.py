"""Input batches shared by the model-level tests."""
import torch


def left_padded(vocab: int, lengths=(14, 10), seed: int = 0, pad_id: int | None = None):
    """Random ids [B, max(lengths)] and a left-padding mask (row b has lengths[b] real tokens at the end); with
    `pad_id`, padded positions hold that id."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, L - n:] = 1
    if pad_id is not None:
        ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask
