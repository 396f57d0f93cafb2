"""Walking a Keras model's graph: what feeds a layer, a function from the model's input to a layer's input or
output, and a forward pass in which each layer gets its own `training` flag. These work on functional graphs
(branches, merges), Sequential models and models nested inside models, not only on the chains convbn builds, so
that precise BN, the batch-statistics forward, diagnose and BN folding serve any model.
"""

from __future__ import annotations

import keras

from .keras_private import made_by, run_through_graph, takes_training


def producer(layer):
    """The layer whose output `layer` takes as its (single) input, or None (the model's input, or several)."""
    try:
        tensor = layer.input
    except (AttributeError, ValueError):  # several inbound nodes (a shared layer): no single answer
        return None
    if isinstance(tensor, (list, tuple)):
        return None
    op = made_by(tensor)
    return None if op is None or isinstance(op, keras.layers.InputLayer) else op


def all_layers(model) -> list:
    """Every layer of `model`, the layers of the models nested in it included (depth first, in each model's order)."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out += all_layers(layer)
    return out


def container(model, layer):
    """The model (`model` itself or one nested in it) whose own layers hold `layer`; None if none does."""
    if any(own is layer for own in model.layers):
        return model
    for inner in model.layers:
        if isinstance(inner, keras.Model):
            found = container(inner, layer)
            if found is not None:
                return found
    return None


def consumers(model, layer) -> list:
    """The layers (of the model that holds `layer`) that take `layer`'s output as their input."""
    model = container(model, layer) or model
    out = []
    for other in model.layers:
        try:
            inputs = other.input
        except (AttributeError, ValueError):
            continue
        for t in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if made_by(t) is layer:
                out.append(other)
                break
    return out


def model_input(model):
    """The model's symbolic input(s). Not `model.input`: Keras 3.15 raises there for a Sequential model that was
    built with an Input but never called as a functional graph (every keras-io convnet loaded from a file)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def input_model(model, layer):
    """f(x, training=False): `layer`'s input when `model` is given x. A model sharing `model`'s layers where the
    layer is in `model`'s own graph; for a layer inside a nested model (not connected to the outer inputs) the
    whole model runs and the layer's input is taken on the way (`tapped`)."""
    try:
        return keras.Model(model_input(model), layer.input)
    except ValueError:  # "not connected to inputs": the layer lives in a nested model's graph
        return tapped(model, layer, "input")


def output_model(model, layer):
    """f(x, training=False): `layer`'s output when `model` is given x (see input_model)."""
    try:
        return keras.Model(model_input(model), layer.output)
    except ValueError:
        return tapped(model, layer, "output")


def tapped(model, layer, which: str):
    """f(x, training=False): run `model` and return what `layer` received ("input") or gave ("output") on its first
    call. The layer's `call` is wrapped for the duration (a Keras layer calls self.call); inside a tf.function the
    rest of the model is pruned from the graph, as nothing uses it."""

    def run(x, training=False):
        seen = []
        original = layer.call

        def call(inputs, *args, **kwargs):
            out = original(inputs, *args, **kwargs)
            seen.append(inputs if which == "input" else out)
            return out

        layer.call = call
        try:
            model(x, training=training)
        finally:
            del layer.call  # the class's call again
        return seen[0]

    return run


def run_graph(model, x, training_for):
    """The model's output for `x`, calling every layer `l` with training=training_for(l).

    Keras gives one `training` flag to a whole model; this walks its graph so that, e.g., BN layers use batch
    statistics while dropout stays off. (Keras' private `_run_through_graph`, keras_private.py, is what
    `Functional.call` itself uses; no public API takes a per-layer flag.)
    """

    def operation_fn(op):
        def call(*args, **kwargs):
            if isinstance(op, keras.Model):  # a nested model: each of its layers gets its own flag too
                return run_graph(op, args[0] if len(args) == 1 else list(args), training_for)
            if takes_training(op):
                kwargs["training"] = training_for(op)
            return op(*args, **kwargs)

        return call

    if isinstance(model, keras.Sequential):
        for layer in model.layers:
            x = operation_fn(layer)(x)
        return x
    outputs = run_through_graph(model, x, operation_fn)
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs
