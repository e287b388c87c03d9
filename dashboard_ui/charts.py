"""Bar and line charts built with plotly.graph_objects from rows (lists of dicts).

plotly.express costs about 80 ms a figure in pandas work before anything is drawn; eight charts made every
rerun of Revenue & credits take most of a second. Traces built directly cost a few milliseconds."""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

MARGIN = dict(l=10, r=10, t=40, b=10)


def _groups(rows: list[dict], key: str | None, order: list | None) -> list:
    if key is None:
        return [None]
    seen = list(dict.fromkeys(row[key] for row in rows))
    return [g for g in order if g in seen] + [g for g in seen if g not in order] if order else seen


def figure(rows: list[dict], *, kind: str, x: str, y: str, title: str, color: str | None = None,
           colors: dict | None = None, order: list | None = None, x_title: str | None = None,
           y_title: str | None = None, barmode: str = "stack", hover: str | None = None) -> go.Figure:
    """One trace per value of `color` (in `order` first), bars or lines with markers."""
    fig = go.Figure()
    for group in _groups(rows, color, order):
        chosen = [row for row in rows if color is None or row[color] == group]
        common = dict(x=[row[x] for row in chosen], y=[row[y] for row in chosen], name=str(group or y),
                      showlegend=color is not None)
        if hover:
            common.update(customdata=[[row[hover]] for row in chosen],
                          hovertemplate=f"%{{x}}<br>{y_title or y}: %{{y}}<br>{hover}: %{{customdata[0]:,}}"
                                        "<extra></extra>")
        style = {"marker_color": colors[group]} if colors and group in colors else {}
        if kind == "bar":
            fig.add_trace(go.Bar(**common, **style))
        else:
            line = {"line_color": colors[group]} if colors and group in colors else {}
            fig.add_trace(go.Scatter(mode="lines+markers", **common, **line, **style))
    fig.update_layout(title=title, barmode=barmode, margin=MARGIN, legend_title_text="",
                      xaxis_title=x_title or x, yaxis_title=y_title or y)
    return fig


def chart(fig: go.Figure, key: str) -> None:
    st.plotly_chart(fig, key=key, width="stretch")
