import sys
p=sys.argv[1]
s=open(p).read()
old=s[s.index("    Step cur, next;"):s.index("}  // namespace w4kern")]
new='''    // A ring of three steps in registers, unrolled so each buffer keeps its
    // registers (a copy between buffers would wait for the load in flight)
    Step buf[3];
    if constexpr (kRowRun) {   // weights a thread skips past K stay defined (see load_step)
#pragma unroll
        for (int r = 0; r < 3; ++r)
#pragma unroll
        for (int i = 0; i < kTiles; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < kWords; ++j) buf[r].w[i][h][j] = 0u;
    }
    auto advance = [&](int& s_, int& t_) { if (++t_ == my_steps) { s_ += gridDim.x; t_ = 0; } };
    load_step(buf[0], set, 0);
    int set1 = set, step1 = 0;
    advance(set1, step1);
    if (set1 < n_sets) load_step(buf[1], set1, step1);
    auto body = [&](Step& cur, Step& fill) -> bool {
        int set2 = set1, step2 = step1;
        advance(set2, step2);
        if (set2 < n_sets) load_step(fill, set2, step2);
        const int b = block_of(set);
        if (b < n_blocks) compute_step(cur);
        if (step1 == 0) finish_block(b);
        if (set1 >= n_sets) return false;
        set = set1; step = step1; set1 = set2; step1 = step2;
        return true;
    };
    while (body(buf[0], buf[2]) && body(buf[1], buf[0]) && body(buf[2], buf[1])) {}
}

'''
s=s.replace(old,new)
open(p,'w').write(s)
