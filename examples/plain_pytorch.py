"""HALRP in the plain PyTorch loop a researcher writes: five calls, nothing else.

    python examples/plain_pytorch.py       # 3 tasks of Split Fashion-MNIST, seconds
"""

import torch
from torch import nn
from torch.utils.data import DataLoader

import halrp_adapt
from halrp_adapt.data.fashion_mnist import class_subset, load_fashion_mnist

torch.manual_seed(0)
data = load_fashion_mnist("embedded")
net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                    nn.Linear(128, 10))
cl = halrp_adapt.attach(net, budget=0.1, train_base=True)    # task 0 trains the MLP itself
for t, classes in enumerate([[0, 1, 2], [3, 4, 5], [6, 7, 8]]):
    train = DataLoader(class_subset(data["train"], classes), batch_size=64, shuffle=True)
    cl.add_task(f"task{t}", num_classes=len(classes))
    if t > 0:
        cl.estimate_ranks(train)                              # trial, Fisher, SVD, ranks
    optimizer = torch.optim.Adam(cl.trainable_parameters(), lr=1e-3)
    for epoch in range(3):
        for x, y in train:
            loss = nn.functional.cross_entropy(cl(x), y) + cl.regularization_loss()
            optimizer.zero_grad(); loss.backward(); optimizer.step()  # noqa: E702
    print(f"task{t}:", cl.end_task(calibration_data=train))   # prune, norm statistics, freeze

cl.eval()
for t, classes in enumerate([[0, 1, 2], [3, 4, 5], [6, 7, 8]]):
    test = class_subset(data["test"], classes)
    with torch.no_grad(), cl.task(f"task{t}"):
        accuracy = (cl(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean()
    print(f"task{t} accuracy {100 * accuracy:.1f}%")
