// Canvas feedback for the AcT nodes:
// - the text a node computes when it runs (what was collected, fitted or steered) is drawn
//   on the node, read-only, and never saved into the workflow;
// - an input whose schema says `act_shown_when: {widget, values}` is shown only while that
//   other widget holds one of the values (e.g. layer_regex only with layers "custom regex");
// - inputs marked `advanced` stay hidden until the node's "Show Advanced" (its context menu),
//   or everywhere with the setting Comfy.Node.AlwaysShowAdvancedWidgets (the canvas reads the
//   flag from the widget itself, where this front end's node definitions do not copy it).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const PREFIX = "AcT";
const SUMMARY = "act_summary";
const LINE_HEIGHT = 15;  // pixels per line of the summary's text box
const CHARACTER_WIDTH = 6.5;  // pixels per character of its monospace font, about
const MAX_LINES = 12;  // taller summaries scroll
const ALWAYS_SHOW_ADVANCED = "Comfy.Node.AlwaysShowAdvancedWidgets";

function widgetNamed(node, name) {
  return node.widgets?.find((widget) => widget.name === name);
}

function inputOptions(nodeData, name) {
  const spec = nodeData.input?.required?.[name] ?? nodeData.input?.optional?.[name];
  return Array.isArray(spec) ? spec[1] ?? {} : {};
}

// {controlling widget: [[dependent widget, shown values], ...]} from the schema.
function visibilityRules(nodeData) {
  const rules = {};
  for (const group of [nodeData.input?.required, nodeData.input?.optional]) {
    for (const name of Object.keys(group ?? {})) {
      const rule = inputOptions(nodeData, name).act_shown_when;
      if (rule) (rules[rule.widget] ??= []).push([name, rule.values]);
    }
  }
  return rules;
}

function applyVisibility(node, rules, resize) {
  const before = node.computeSize()[1];
  for (const [controlling, dependents] of Object.entries(rules)) {
    const value = widgetNamed(node, controlling)?.value;
    for (const [name, values] of dependents) {
      const widget = widgetNamed(node, name);
      if (widget) widget.hidden = !values.includes(value);
    }
  }
  if (resize) {
    const change = node.computeSize()[1] - before;
    node.setSize([node.size[0], Math.max(node.size[1] + change, node.computeSize()[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

function markAdvancedWidgets(node) {
  let any = false;
  for (const widget of node.widgets ?? []) {
    if (widget.options?.advanced) {
      // with the widgets that belong to it (a seed's "control after generate")
      for (const part of [widget, ...(widget.linkedWidgets ?? [])]) part.advanced = true;
      any = true;
    }
  }
  if (any && app.extensionManager?.setting?.get?.(ALWAYS_SHOW_ADVANCED)) {
    node.showAdvanced = true;
  }
  return any;
}

function watchControllingWidgets(node, rules) {
  for (const controlling of Object.keys(rules)) {
    const widget = widgetNamed(node, controlling);
    if (!widget) continue;
    const callback = widget.callback;
    widget.callback = function (...args) {
      const result = callback?.apply(this, args);
      applyVisibility(node, rules, true);
      return result;
    };
  }
}

function showSummary(node, text) {
  let widget = widgetNamed(node, SUMMARY);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, SUMMARY, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    widget.options = { ...widget.options, serialize: false };
    const element = widget.inputEl ?? widget.element;
    if (element) {
      element.readOnly = true;
      element.title = "What this node did when it last ran";
    }
  }
  const perLine = Math.max(20, Math.floor((node.size[0] - 30) / CHARACTER_WIDTH));
  const rows = text.split("\n").reduce((sum, line) => sum + Math.max(1, Math.ceil(line.length / perLine)), 0);
  const lines = Math.min(rows, MAX_LINES);
  widget.options.getMinHeight = () => lines * LINE_HEIGHT + 12;
  widget.value = text;
  const height = node.computeSize()[1];
  if (node.size[1] < height) node.setSize([node.size[0], height]);
  node.setDirtyCanvas?.(true, true);
}

function summaryText(output) {
  const text = output?.text;
  if (text === undefined || text === null) return null;
  return Array.isArray(text) ? text.join("\n") : String(text);
}

app.registerExtension({
  name: "AcT.NodeFeedback",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith(PREFIX)) return;
    const rules = visibilityRules(nodeData);
    const hasRules = Object.keys(rules).length > 0;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      const advanced = markAdvancedWidgets(this);
      if (hasRules) watchControllingWidgets(this, rules);
      applyVisibility(this, rules, false);
      if (advanced || hasRules) this.setSize([this.size[0], this.computeSize()[1]]);
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      if (hasRules) applyVisibility(this, rules, false);  // keep the saved size
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output, ...rest) {
      const result = onExecuted?.apply(this, [output, ...rest]);
      const text = summaryText(output);
      if (text !== null) showSummary(this, text);
      return result;
    };
  },
});
