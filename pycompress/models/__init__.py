"""Model zoo: ``build(name, in_channels=..., num_classes=..., **arch_kwargs)``.

Registered models (see each factory's docstring for its arguments and supported input sizes):
lenet300, lenet5, mobilenet_student, resnet18 (torchvision), cifar_resnet / resnet20 / resnet56 /
resnet110, preresnet, densenet_bc, wrn, vgg / vgg{11,13,16,19}[_bn].

Models from outside the zoo (``pycompress.models.external``): ``torchvision:<name>``,
``timm:<name>`` (needs timm) and ``import:<package.module>:<function>``, accepted by ``build``.
"""

# Importing the model modules registers them.
from . import cifar_resnet, densenet, fashion_cnn, lenet, mobilenet, torchvision_models, vgg, wrn  # noqa: F401,E402
from .cifar_resnet import CifarResNet, PreResNet  # noqa: E402
from .densenet import DenseNet  # noqa: E402
from .lenet import LeNet5, LeNet300  # noqa: E402
from .mobilenet import MobileNetStudent, student_widths  # noqa: E402
from .registry import accepted_kwargs, build, check_name, is_external, names, register, register_alias
from .vgg import VGG  # noqa: E402
from .wrn import WideResNet  # noqa: E402

__all__ = [
    "build",
    "names",
    "register",
    "register_alias",
    "accepted_kwargs",
    "check_name",
    "is_external",
    "MobileNetStudent",
    "student_widths",
    "LeNet300",
    "LeNet5",
    "CifarResNet",
    "PreResNet",
    "DenseNet",
    "WideResNet",
    "VGG",
]
