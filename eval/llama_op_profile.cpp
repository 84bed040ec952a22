// Where a decoded token's time goes in llama.cpp: every node of the decode graph timed on its own.
//
//   llama_op_profile MODEL.gguf THREADS DECODE TOKEN_ID...      (the token ids are the prompt)
//
// Built by eval/bench_time_split.py against the llama.cpp build `scripts/setup.sh` makes (the same sources as
// llama-quantize). It links libllama and uses only its public API:
//   1. a plain context (llama.cpp's defaults: f16 KV cache, flash attention auto) decodes the prompt and then
//      DECODE greedy tokens; llama.cpp's own counters (llama_perf_context: t_eval_ms / n_eval) give the real time
//      per decoded token, and the wall clock around each llama_decode its spread;
//   2. a second context with an evaluation callback (cb_eval, the hook llama.cpp offers to inspect tensors) does
//      the same; the scheduler then computes the decode graph one node at a time (ask → compute → synchronize →
//      callback), so the time from the node's `ask` to its callback is that node's compute time plus a fixed
//      per-call cost, which the nodes that compute nothing (views, reshapes, permutes) measure.
// Output: one JSON object on stdout: the real time per token, and per node kind (its name without the layer
// index, its op, the weight it reads) the number of calls and their total microseconds; the Python side sorts
// the kinds into MLP, attention, LM head / embedding and the rest.
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

using clk = std::chrono::steady_clock;

struct Prof {
    bool active = false;
    clk::time_point t0;
    std::map<std::string, std::pair<long, double>> acc;   // key → (calls, microseconds)
    std::vector<double> empty_us;                          // the calls of nodes that compute nothing
};

// "ffn_up-12" → "ffn_up"; "blk.12.ffn_up.weight" → "ffn_up.weight"
static std::string strip_layer(const char * name) {
    std::string s(name);
    if (s.rfind("blk.", 0) == 0) {
        size_t dot = s.find('.', 4);
        return dot == std::string::npos ? s : s.substr(dot + 1);
    }
    size_t dash = s.rfind('-');
    if (dash != std::string::npos && dash + 1 < s.size() &&
        std::all_of(s.begin() + dash + 1, s.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        return s.substr(0, dash);
    }
    return s;
}

static bool is_empty(const ggml_tensor * t) {
    return t->op == GGML_OP_NONE || t->op == GGML_OP_VIEW || t->op == GGML_OP_RESHAPE || t->op == GGML_OP_PERMUTE ||
           t->op == GGML_OP_TRANSPOSE;
}

static bool on_node(ggml_tensor * t, bool ask, void * user) {
    auto * p = static_cast<Prof *>(user);
    if (!p->active) {
        return false;   // not asked: the scheduler computes the rest of the graph in one call
    }
    if (ask) {
        p->t0 = clk::now();
        return true;
    }
    double us = std::chrono::duration<double, std::micro>(clk::now() - p->t0).count();
    // the weight a node reads: the first source that is a named model tensor (a matrix product's weight)
    std::string weight;
    for (int i = 0; i < GGML_MAX_SRC && t->src[i]; i++) {
        if (t->src[i]->op == GGML_OP_NONE && strstr(t->src[i]->name, ".weight")) {
            weight = strip_layer(t->src[i]->name);
            break;
        }
    }
    std::string key = strip_layer(t->name) + "|" + ggml_op_desc(t) + "|" + weight;
    auto & a = p->acc[key];
    a.first += 1;
    a.second += us;
    if (is_empty(t)) {
        p->empty_us.push_back(us);
    }
    return true;
}

static llama_token argmax(llama_context * ctx, int n_vocab) {
    const float * l = llama_get_logits_ith(ctx, -1);
    return (llama_token) (std::max_element(l, l + n_vocab) - l);
}

// decode the prompt, then n greedy tokens one at a time; the wall time of each token's llama_decode (ms)
static std::vector<double> run(llama_context * ctx, std::vector<llama_token> prompt, int n, int n_vocab, Prof * p) {
    llama_memory_clear(llama_get_memory(ctx), true);
    if (llama_decode(ctx, llama_batch_get_one(prompt.data(), (int32_t) prompt.size()))) {
        fprintf(stderr, "llama_decode failed on the prompt\n");
        exit(1);
    }
    llama_perf_context_reset(ctx);
    std::vector<double> ms;
    llama_token tok = argmax(ctx, n_vocab);
    for (int i = 0; i < n; i++) {
        if (p) {
            p->active = true;
        }
        auto t0 = clk::now();
        if (llama_decode(ctx, llama_batch_get_one(&tok, 1))) {
            fprintf(stderr, "llama_decode failed at token %d\n", i);
            exit(1);
        }
        ms.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
        if (p) {
            p->active = false;
        }
        tok = argmax(ctx, n_vocab);
    }
    return ms;
}

static llama_context * context(llama_model * model, int threads, int n_ctx, Prof * p) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_ctx;
    cp.n_ubatch = n_ctx;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.no_perf = false;
    if (p) {
        cp.cb_eval = on_node;
        cp.cb_eval_user_data = p;
    }
    return llama_init_from_model(model, cp);
}

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf THREADS DECODE TOKEN_ID...\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[2]), n = atoi(argv[3]);
    std::vector<llama_token> prompt;
    for (int i = 4; i < argc; i++) {
        prompt.push_back(atoi(argv[i]));
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    int n_ctx = (int) prompt.size() + n + 16;

    llama_context * plain = context(model, threads, n_ctx, nullptr);
    run(plain, prompt, 4, n_vocab, nullptr);   // warm-up: pages the weights in, sizes the buffers
    std::vector<double> wall = run(plain, prompt, n, n_vocab, nullptr);
    llama_perf_context_data perf = llama_perf_context(plain);
    llama_free(plain);

    Prof prof;
    llama_context * timed = context(model, threads, n_ctx, &prof);
    run(timed, prompt, 2, n_vocab, nullptr);
    prof.acc.clear();
    prof.empty_us.clear();
    std::vector<double> pwall = run(timed, prompt, n, n_vocab, &prof);
    llama_free(timed);
    llama_model_free(model);

    std::sort(prof.empty_us.begin(), prof.empty_us.end());
    double empty_median = prof.empty_us.empty() ? 0.0 : prof.empty_us[prof.empty_us.size() / 2];
    auto total = [](const std::vector<double> & v) { double s = 0; for (double x : v) s += x; return s; };
    std::sort(wall.begin(), wall.end());
    printf("{\"tokens\": %d, \"threads\": %d, \"prompt\": %zu, \"perf_ms_per_token\": %.6f, \"perf_n_eval\": %d, "
           "\"wall_ms_per_token\": %.6f, \"wall_ms_min\": %.6f, \"wall_ms_median\": %.6f, \"wall_ms_max\": %.6f, "
           "\"profiled_ms_per_token\": %.6f, \"empty_node_us_median\": %.6f, \"nodes\": [",
           n, threads, prompt.size(), perf.n_eval ? perf.t_eval_ms / perf.n_eval : 0.0, perf.n_eval,
           total(wall) / n, wall.front(), wall[wall.size() / 2], wall.back(), total(pwall) / n, empty_median);
    bool first = true;
    for (auto & [key, v] : prof.acc) {
        size_t a = key.find('|'), b = key.find('|', a + 1);
        printf("%s{\"name\": \"%s\", \"op\": \"%s\", \"weight\": \"%s\", \"calls\": %ld, \"us\": %.3f}",
               first ? "" : ", ", key.substr(0, a).c_str(), key.substr(a + 1, b - a - 1).c_str(),
               key.substr(b + 1).c_str(), v.first, v.second);
        first = false;
    }
    printf("]}\n");
    return 0;
}
