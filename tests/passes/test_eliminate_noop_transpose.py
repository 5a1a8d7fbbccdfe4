from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons

PASS = "eliminate_noop_transpose"


def test_identity_permutation_is_removed():
    g = GraphBuilder((1, 3, 4, 5))
    model = g.build(g.node("Relu", [g.node("Transpose", ["x"], perm=[0, 1, 2, 3])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (1, 3, 4, 5))


def test_rank1_transpose_without_perm_is_removed():
    g = GraphBuilder((6,))
    model = g.build(g.node("Relu", [g.node("Transpose", ["x"])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]


def test_nchw_to_nhwc_and_back_disappears_and_keeps_the_output_name():
    g = GraphBuilder((1, 3, 4, 5))
    nhwc = g.node("Transpose", [g.node("Relu", ["x"])], perm=[0, 2, 3, 1])
    out = g.node("Transpose", [nhwc], perm=[0, 3, 1, 2])
    model = g.build(out)
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert run.model.graph.output[0].name == out
    assert_same_outputs(model, run.model, (1, 3, 4, 5))


def test_two_transposes_compose_into_one():
    g = GraphBuilder((2, 3, 4))
    first = g.node("Transpose", ["x"], perm=[1, 0, 2])
    model = g.build(g.node("Relu", [g.node("Transpose", [first], perm=[0, 2, 1])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Transpose", "Relu"]
    perm = list(run.model.graph.node[0].attribute[0].ints)
    assert perm == [1, 2, 0]
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_three_transposes_reduce_to_the_identity():
    g = GraphBuilder((2, 3, 4))
    a = g.node("Transpose", ["x"], perm=[1, 2, 0])
    b = g.node("Transpose", [a], perm=[1, 2, 0])
    model = g.build(g.node("Relu", [g.node("Transpose", [b], perm=[1, 2, 0])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_refusals():
    g = GraphBuilder((2, 3, 4))
    shared = g.node("Transpose", ["x"], perm=[1, 0, 2])
    composed = g.node("Transpose", [shared], perm=[0, 2, 1])
    model = g.build([g.node("Relu", [composed]), g.node("Neg", [shared])])
    run = apply(model, PASS)
    assert op_types(run.model).count("Transpose") == 2
    text = reasons(run, PASS)
    assert "permutation (1, 0, 2) is not the identity" in text
    assert "its input is not produced by a Transpose" in text
    assert "has other consumers" in text


def test_shared_inner_still_allows_an_inverse_pair_to_go():
    g = GraphBuilder((2, 3, 4))
    shared = g.node("Transpose", ["x"], perm=[1, 0, 2])
    back = g.node("Transpose", [shared], perm=[1, 0, 2])
    model = g.build([g.node("Relu", [back]), g.node("Neg", [shared])])
    run = apply(model, PASS)
    assert sorted(op_types(run.model)) == ["Neg", "Relu", "Transpose"]
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_identity_transpose_from_input_to_output_is_kept():
    g = GraphBuilder((2, 3))
    model = g.build(g.node("Transpose", ["x"], perm=[0, 1]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Transpose"]
    assert "preserve the output name" in reasons(run, PASS)


def test_inverse_pair_from_input_to_output_becomes_one_identity_transpose():
    g = GraphBuilder((2, 3))
    out = g.node("Transpose", [g.node("Transpose", ["x"], perm=[1, 0])], perm=[1, 0])
    model = g.build(out)
    run = apply(model, PASS)
    assert op_types(run.model) == ["Transpose"]
    assert run.model.graph.output[0].name == out
    assert "preserve the output name" in reasons(run, PASS)
    assert_same_outputs(model, run.model, (2, 3))
