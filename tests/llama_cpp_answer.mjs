// Greedy answers from a GGUF file through llama.cpp (node-llama-cpp's prebuilt build), each question
// alone in the model's own chat template, as tests/test_export.py compares them with ours.
//
//     node tests/llama_cpp_answer.mjs model.gguf MAX_TOKENS < questions.json   # a JSON list
//
// Prints one JSON list of answers. The chat template is the one stored in the GGUF (its
// tokenizer.chat_template), rendered by node-llama-cpp's Jinja wrapper; the history holds no
// system message, so the template adds its own default system turn, as palora's prompts do
// (node-llama-cpp's LlamaChatSession would otherwise add its own system prompt).
import { readFileSync } from "node:fs";
import { getLlama, JinjaTemplateChatWrapper, LlamaChatSession } from "node-llama-cpp";

const [modelPath, maxTokens] = process.argv.slice(2);
const questions = JSON.parse(readFileSync(0, "utf8"));
const llama = await getLlama({ gpu: false, logLevel: "error" });
const model = await llama.loadModel({ modelPath });
const template = model.fileInfo.metadata.tokenizer.chat_template;
const context = await model.createContext({ contextSize: 512, threads: 1 });
const session = new LlamaChatSession({
    contextSequence: context.getSequence(),
    chatWrapper: new JinjaTemplateChatWrapper({ template }),
});
const answers = [];
for (const question of questions) {
    session.setChatHistory([]);
    const text = await session.prompt(question, { temperature: 0, maxTokens: Number(maxTokens) });
    answers.push(text);
}
console.log(JSON.stringify(answers));
await llama.dispose();
