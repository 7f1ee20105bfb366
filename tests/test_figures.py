"""The studies' figures fit their contents: nothing is cut at the figure's edges."""

import pytest

from hemnet_jax.studies import figures


def _table1(num_columns: int, rows=(1, 2, 3, 4, 6, 8)):
    cols = [f"eta={0.1 * (i + 1):.1f}" for i in range(num_columns - 1)] + ["EMANet"]
    values = {(t, c): 0.3 + 0.01 * i + 0.001 * t for i, c in enumerate(cols) for t in rows}
    values[(rows[0], cols[0])] = None  # a cell that did not finish
    return figures.table1_figure(list(rows), cols, values, {c: rows[-1] for c in cols})


@pytest.mark.parametrize("num_columns,num_rows", [(1, 1), (1, 6), (12, 6)])
def test_table1_title_and_labels_lie_inside_the_figure(num_columns, num_rows):
    """Issue 21, item 6: a one-column Table 1 cut its own title ("oU by T_train (best per column
    outline"); the figure is now sized to its grid, its title and its labels."""
    import matplotlib.pyplot as plt

    fig = _table1(num_columns, rows=(1, 2, 3, 4, 6, 8)[:num_rows])
    try:
        fig.canvas.draw()  # lays the figure out as savefig does
        renderer = fig.canvas.get_renderer()
        inside = fig.bbox
        (title,) = [t for t in fig.texts if t.get_text() == figures.TABLE1_TITLE]
        (ax, _colour_bar) = fig.axes
        texts = [title, *ax.get_xticklabels(), *ax.get_yticklabels(), ax.yaxis.label]
        for text in texts:
            box = text.get_window_extent(renderer)
            assert box.width > 0, text
            assert (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
                    and box.y1 <= inside.y1), (text.get_text(), box, inside)
        labels = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels()),
                        key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in zip(labels, labels[1:], strict=False))  # no overlap
        width, height = fig.get_size_inches()
        assert width >= 1.3 * num_columns + 2 and height == pytest.approx(0.6 * num_rows + 1.6)
    finally:
        plt.close(fig)
