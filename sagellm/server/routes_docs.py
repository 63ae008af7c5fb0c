"""The API's description: /openapi.json and TGI's /api-doc/openapi.json (sagellm/api/openapi.py),
and /docs, a self-contained page that renders it (no script or style from elsewhere, so it works
where the container has no internet, as SageMaker's often has not)."""

from __future__ import annotations

from flask import Blueprint, Response

from sagellm.api.openapi import document
from sagellm.api.responses import JsonResponse
from sagellm.server.http import to_flask

bp = Blueprint("docs", __name__)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sagellm API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
h2{margin-top:1.6em;border-bottom:1px solid #ddd}
details{margin:.3em 0 .3em 1em}summary{cursor:pointer}
.op{margin:1em 0;padding:.4em .8em;border-left:4px solid #89a}.m{font-weight:bold;text-transform:uppercase;
display:inline-block;width:4.5em}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:13px}
code{background:#f2f2f2;padding:0 .2em}
</style></head><body>
<h1>sagellm API</h1><p id="about">Loading <a href="/openapi.json">/openapi.json</a>...</p>
<div id="paths"></div><h2>Schemas</h2><div id="schemas"></div>
<script>
function esc(s){return String(s).replace(/[&<>]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;"}[c]))}
function show(schema){
  var text=esc(JSON.stringify(schema,null,2));
  return "<pre>"+text.replace(/"#\\/components\\/schemas\\/([^"]+)"/g,function(m,name){
    return '"<a href="#s-'+name+'">#/components/schemas/'+name+'</a>"'})+"</pre>"}
function block(title,content){
  var out="";for(var type in content){out+="<details><summary>"+esc(title)+" <code>"+esc(type)+"</code></summary>"+
    (content[type].description?"<p>"+esc(content[type].description)+"</p>":"")+show(content[type].schema)+"</details>"}
  return out}
fetch("/openapi.json").then(r=>r.json()).then(function(doc){
  document.getElementById("about").textContent=doc.info.title+" "+doc.info.version+": "+doc.info.description;
  var html="";
  for(var path in doc.paths){for(var method in doc.paths[path]){var op=doc.paths[path][method];
    html+='<div class="op"><span class="m">'+esc(method)+"</span> <code>"+esc(path)+"</code> "+esc(op.summary);
    if(op.requestBody)html+=block("Request body",op.requestBody.content);
    for(var status in op.responses){var r=op.responses[status];html+=block(status+" "+r.description,r.content||{})}
    html+="</div>"}}
  document.getElementById("paths").innerHTML=html;
  var s="";for(var name in doc.components.schemas){
    s+='<details id="s-'+esc(name)+'"><summary>'+esc(name)+"</summary>"+show(doc.components.schemas[name])+"</details>"}
  document.getElementById("schemas").innerHTML=s;
  if(location.hash){var el=document.getElementById(location.hash.slice(1));if(el){el.open=true;el.scrollIntoView()}}
});
</script></body></html>
"""


def _document() -> Response:
    return to_flask(JsonResponse(document()))


bp.add_url_rule("/openapi.json", "openapi", _document, methods=["GET"])
bp.add_url_rule("/api-doc/openapi.json", "api_doc_openapi", _document, methods=["GET"])


@bp.get("/docs")
def docs() -> Response:
    return Response(_PAGE, mimetype="text/html")
